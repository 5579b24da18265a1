"""Real parameter shapes of ResNet-50 and ViT-B/16 without importing torchvision (whose
only wheel here is a CUDA build), so optimizer benchmarks see the true tensor mix."""
from __future__ import annotations


def resnet50_shapes(num_classes: int = 1000) -> list[tuple[int, ...]]:
    """torchvision resnet50: 25,557,032 parameters in 161 tensors."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out_ch = width * 4
            shapes += [(width, in_ch, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out_ch, width, 1, 1), (out_ch,), (out_ch,)]
            if block == 0:
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    return shapes + [(num_classes, 2048), (num_classes,)]


def vit_b16_shapes(num_classes: int = 1000, image_size: int = 224) -> list[tuple[int, ...]]:
    """torchvision vit_b_16: 86,567,656 parameters in 152 tensors."""
    dim, mlp, layers = 768, 3072, 12
    tokens = (image_size // 16) ** 2 + 1
    shapes: list[tuple[int, ...]] = [(1, 1, dim), (dim, 3, 16, 16), (dim,), (1, tokens, dim)]
    for _ in range(layers):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (mlp, dim), (mlp,), (dim, mlp), (dim,)]
    return shapes + [(dim,), (dim,), (num_classes, dim), (num_classes,)]


MODELS = {"resnet50": resnet50_shapes, "vit_b16": vit_b16_shapes}


def numel(shapes: list[tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


if __name__ == "__main__":
    for name, fn in MODELS.items():
        print(name, len(fn()), numel(fn()))
