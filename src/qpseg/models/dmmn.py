"""Deep Multi-Magnification Networks of ho2021 (Med. Image Anal. 2021), Section 2.4, Fig. 4.

§2.2: the target patch is 256×256 px at 20×; from the 1024×1024 px region centred on it three
256×256 inputs are made: the central 256 px at 20×, the central 512 px downsampled ×2 (10×) and
the whole 1024 px downsampled ×4 (5×). Contract: three inputs at scales 1, 2, 4 of the base mpp
(≈0.5 µm/px), output 256×256 at the base mpp, tiles without overlap (§2.6).

§2.4: "CONV_BLOCK contains two sets of a convolutional layer with kernel size of 3×3 with padding
of 1 followed by a rectified linear unit (ReLU) [...] CONV_TR_u contains a transposed
convolutional layer followed by the ReLU [...] CONV_FINAL contains a convolutional layer with
kernel size of 3×3 with padding of 1, the ReLU activation function, and a convolutional layer
with kernel size of 1×1 to output C channels. [...] Green arrows are max-pooling operations by a
factor of 2 and red arrows are center-crop operations", and for DMMN-M3 (Fig. 4e) "multiple
encoders and decoders [with] concatenations between the decoders in multiple layers to enrich
feature maps from the decoders in 10× and 5× to the decoder in 20×", channels "reduced by a
factor of 2 from an original U-Net". Transposed convolutions are 3×3, stride 2 (the authors'
code, MSKCC-Computational-Pathology/DMMN): with C = 7 this reproduces Table 2's parameter counts
exactly (U-Net 34,550,663; DMMN-S2 34,554,119; DMMN-M3 27,071,303).

* ``dmmn_m3`` — the proposed multi-encoder multi-decoder multi-concatenation network.
* ``dmmn_s1`` — the single-magnification U-Net baseline (Fig. 4a, DSMN).
* ``dmmn_s2`` — single-encoder single-decoder DMMN: the three patches concatenated (Fig. 4b).
"""

from __future__ import annotations

import torch
from torch import nn

from qpseg.models._base import QpsegModule, check_positive_int
from qpseg.models.contract import InputSpec, ModelContract
from qpseg.models.registry import register_model

__all__ = ["DMMNM3", "DMMNUNet", "center_crop", "dmmn_m3", "dmmn_s1", "dmmn_s2",
           "init_like_authors"]

PAPER = "ho2021 (Med. Image Anal. 67:101866), Section 2.4, Fig. 4"
BASE_MPP = 0.5  # 20×
SCALES = (1.0, 2.0, 4.0)  # 20×, 10×, 5×
DEPTH = 4


def _conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    """CONV_BLOCK: (3×3 conv, padding 1, ReLU) × 2."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.ReLU(inplace=True))


def _conv_tr(in_ch: int, out_ch: int) -> nn.Sequential:
    """CONV_TR_2: 3×3 transposed convolution, stride 2 (exact ×2), ReLU."""
    return nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1,
                                            output_padding=1), nn.ReLU(inplace=True))


def _conv_final(ch: int, num_classes: int) -> nn.Sequential:
    """CONV_FINAL: 3×3 conv, ReLU, 1×1 conv to the classes (softmax applied by ``predict``)."""
    return nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(ch, num_classes, 1))


def init_like_authors(module: nn.Module) -> None:
    """Kaiming-normal weights (fan-in, ReLU gain) and zero biases in every convolution and
    transposed convolution, as the authors' code starts training (training.py, ``init_weights``
    applied with ``model.apply``). PyTorch's default initialisation shrinks the signal through
    the 20+ plain ReLU layers to almost nothing: the output is nearly constant and, at
    SGD 5e-5, only its bias learns."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def center_crop(x: torch.Tensor, rate: int) -> torch.Tensor:
    """The central ``1/rate`` of the feature map in each spatial dimension (Fig. 4 red arrows)."""
    h, w = x.shape[-2:]
    ch, cw = h // rate, w // rate
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top:top + ch, left:left + cw]


class _Encoder(nn.Module):
    def __init__(self, in_ch: int, widths: list[int]) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        prev = in_ch
        for w in widths[:-1]:
            self.down.append(_conv_block(prev, w))
            prev = w
        self.pool = nn.MaxPool2d(2)
        self.center = _conv_block(prev, widths[-1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        return self.center(x), skips


class _Decoder(nn.Module):
    """U-Net decoder; ``extra[i]`` channels are concatenated before up-step ``i`` (coarse
    first), which is how DMMN-M3's 20× decoder receives the 10×/5× decoder features."""

    def __init__(self, widths: list[int], extra: list[int] | None = None) -> None:
        super().__init__()
        extra = extra or [0] * (len(widths) - 1)
        self.tr = nn.ModuleList()
        self.conv = nn.ModuleList()
        prev = widths[-1]
        for i, w in enumerate(reversed(widths[:-1])):
            self.tr.append(_conv_tr(prev + extra[i], w))
            self.conv.append(_conv_block(2 * w, w))
            prev = w

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor],
                extra: list[list[torch.Tensor]] | None = None) -> list[torch.Tensor]:
        """Returns the output of every up-step, coarse to fine (the last is full resolution)."""
        outs = []
        for i, (tr, conv) in enumerate(zip(self.tr, self.conv, strict=True)):
            if extra is not None and extra[i]:
                x = torch.cat([x, *extra[i]], dim=1)
            x = tr(x)
            x = conv(torch.cat([skips[-1 - i], x], dim=1))
            outs.append(x)
        return outs


def _widths(base_filters: int) -> list[int]:
    return [base_filters << i for i in range(DEPTH + 1)]


def _check_tile(tile_px: int) -> int:
    tile_px = check_positive_int("tile_px", tile_px, maximum=1 << 14)
    if tile_px % (1 << DEPTH) or tile_px < 4 << DEPTH:
        raise ValueError(f"tile_px must be a multiple of {1 << DEPTH} and at least "
                         f"{4 << DEPTH}, not {tile_px}")
    return tile_px


def _inputs(tile_px: int, scales: tuple[float, ...]) -> tuple[InputSpec, ...]:
    names = {1.0: "20x", 2.0: "10x", 4.0: "5x"}
    return tuple(InputSpec(f"image_{names[s]}", tile_px, s, 3) for s in scales)


class DMMNM3(QpsegModule):
    """DMMN-M3: encoder-decoder pairs at 20×, 10×, 5×; centre-cropped 10×/5× decoder features
    are concatenated into the 20× decoder at every scale they cover."""

    def __init__(self, num_classes: int, *, base_filters: int = 32, tile_px: int = 256) -> None:
        super().__init__()
        base_filters = check_positive_int("base_filters", base_filters, maximum=1024)
        tile_px = _check_tile(tile_px)
        w = _widths(base_filters)
        self.enc_20x, self.enc_10x, self.enc_5x = (_Encoder(3, w) for _ in range(3))
        self.dec_10x = _Decoder(w)
        self.dec_5x = _Decoder(w)
        # 20× up-step i (coarse first) receives the 10× decoder output of the level below it
        # and, for the first three steps, the 5× output two levels below (Fig. 4e).
        rev = list(reversed(w[:-1]))  # decoder output widths, coarse to fine
        extra = [rev[0] + rev[1], rev[1] + rev[2], rev[2] + rev[3], rev[3]]
        self.dec_20x = _Decoder(w, extra)
        self.final = _conv_final(w[0], num_classes)
        self.contract = ModelContract(
            architecture="dmmn_m3", num_classes=num_classes, inputs=_inputs(tile_px, SCALES),
            output="pixel", tile_px=tile_px, output_px=tile_px, size_multiple=1 << DEPTH,
            paper=f"{PAPER} (DMMN-M3)", default_mpp=BASE_MPP,
            notes="inputs: central tile_px at 20x, central 2*tile_px at 10x, central "
                  "4*tile_px at 5x, each tile_px pixels")
        init_like_authors(self)

    def forward(self, x20: torch.Tensor, x10: torch.Tensor, x5: torch.Tensor) -> torch.Tensor:
        c5, s5 = self.enc_5x(x5)
        u5 = self.dec_5x(c5, s5)  # sizes S/8, S/4, S/2, S
        c10, s10 = self.enc_10x(x10)
        u10 = self.dec_10x(c10, s10)
        c20, s20 = self.enc_20x(x20)
        extra = [[center_crop(u10[0], 2), center_crop(u5[1], 4)],
                 [center_crop(u10[1], 2), center_crop(u5[2], 4)],
                 [center_crop(u10[2], 2), center_crop(u5[3], 4)],
                 [center_crop(u10[3], 2)]]
        u20 = self.dec_20x(c20, s20, extra)
        return self.final(u20[-1])


class DMMNUNet(QpsegModule):
    """The original U-Net in ho2021's blocks: DSMN (one 20× input) or DMMN-S2 (three inputs
    concatenated into one encoder)."""

    def __init__(self, num_classes: int, *, name: str, scales: tuple[float, ...],
                 base_filters: int = 64, tile_px: int = 256) -> None:
        super().__init__()
        base_filters = check_positive_int("base_filters", base_filters, maximum=1024)
        tile_px = _check_tile(tile_px)
        w = _widths(base_filters)
        self.encoder = _Encoder(3 * len(scales), w)
        self.decoder = _Decoder(w)
        self.final = _conv_final(w[0], num_classes)
        label = "DSMN U-Net, Fig. 4a" if len(scales) == 1 else "DMMN-S2, Fig. 4b"
        self.contract = ModelContract(
            architecture=name, num_classes=num_classes, inputs=_inputs(tile_px, scales),
            output="pixel", tile_px=tile_px, output_px=tile_px, size_multiple=1 << DEPTH,
            paper=f"{PAPER} ({label})", default_mpp=BASE_MPP)
        init_like_authors(self)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)
        center, skips = self.encoder(x)
        return self.final(self.decoder(center, skips)[-1])


_TINY = {"base_filters": 4, "tile_px": 64}


@register_model("dmmn_m3", paper=PAPER, tiny=_TINY,
                summary="DMMN-M3: three magnifications (20x/10x/5x), multi-concatenation")
def dmmn_m3(num_classes: int, *, base_filters: int = 32, tile_px: int = 256) -> DMMNM3:
    """ho2021's DMMN-M3 (channels halved from U-Net: 32 ... 512)."""
    return DMMNM3(num_classes, base_filters=base_filters, tile_px=tile_px)


@register_model("dmmn_s1", paper=PAPER, tiny=_TINY,
                summary="single-magnification U-Net baseline of ho2021 (DSMN)")
def dmmn_s1(num_classes: int, *, base_filters: int = 64, tile_px: int = 256) -> DMMNUNet:
    """ho2021's single-magnification U-Net (20× only; 64 ... 1024 channels)."""
    return DMMNUNet(num_classes, name="dmmn_s1", scales=SCALES[:1], base_filters=base_filters,
                    tile_px=tile_px)


@register_model("dmmn_s2", paper=PAPER, tiny=_TINY,
                summary="DMMN-S2: 20x/10x/5x patches concatenated into one U-Net")
def dmmn_s2(num_classes: int, *, base_filters: int = 64, tile_px: int = 256) -> DMMNUNet:
    """ho2021's single-encoder single-decoder DMMN (inputs concatenated, 9 channels)."""
    return DMMNUNet(num_classes, name="dmmn_s2", scales=SCALES, base_filters=base_filters,
                    tile_px=tile_px)
