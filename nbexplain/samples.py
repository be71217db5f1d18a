"""Real photos that ship with installed packages (scikit-image), for offline demos and tests."""
from __future__ import annotations

from PIL import Image

from ._errors import unknown

# our name -> scikit-image data function (only files bundled in the wheel: no download)
SAMPLES = {"cat": "chelsea", "coffee": "coffee", "astronaut": "astronaut", "rocket": "rocket",
           "motorcycle": "stereo_motorcycle", "camera": "camera"}


def sample_image(name: str = "cat") -> Image.Image:
    """A real photo as a PIL RGB image: cat, coffee, astronaut, rocket, motorcycle, camera."""
    if name not in SAMPLES:
        raise unknown("sample image", name, SAMPLES)
    import skimage.data
    data = getattr(skimage.data, SAMPLES[name])()
    if isinstance(data, tuple):           # stereo_motorcycle returns (left, right, disparity)
        data = data[0]
    return Image.fromarray(data).convert("RGB")


def sample_images() -> dict[str, Image.Image]:
    return {name: sample_image(name) for name in SAMPLES}
