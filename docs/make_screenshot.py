"""Render the extension's screenshot offscreen from a real reconstruction: the volume's three orthogonal
planes in 3-D among the Gaussians drawn as ellipsoids (as the Slicer module shows them; the corner
towards the viewer cut away to show the planes), beside the standard-plane montage.

    python docs/make_screenshot.py demo_output/sub01 docs/images/GaussianSVR_screenshot.png

The folder holds a run's volume.nii.gz and gaussians.npz (``gaussiansvr demo`` writes them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (registers the offscreen render window)
from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkFiltersCore import vtkPolyDataNormals
from vtkmodules.vtkRenderingCore import (
    vtkActor,
    vtkImageActor,
    vtkPolyDataMapper,
    vtkRenderer,
    vtkRenderWindow,
    vtkWindowToImageFilter,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from GaussianSVRLib.export.montage import write_montage  # noqa: E402
from GaussianSVRLib.geometry import image_affine  # noqa: E402
from GaussianSVRLib.io.gaussians_file import ellipsoid_polydata, load_gaussians  # noqa: E402
from GaussianSVRLib.io.outputs import write_png  # noqa: E402

#: Size (pixels) of the 3-D panel; the montage is scaled to its height.
VIEW_SIZE = (720, 720)
ELLIPSOID_COLOUR = (1.0, 0.55, 0.1)
ELLIPSOIDS = 4000
#: Ellipsoid semi-axes in standard deviations (the module's glyph scale).
ELLIPSOID_SCALE = 1.0
#: From where the camera looks, in LPS: the patient's right, anterior, above.
VIEW_DIRECTION = np.array([-1.0, -2.0, 0.8])


def plane_actors(image: sitk.Image) -> list[vtkImageActor]:
    """The volume's three central planes (voxel axes) as image actors in LPS world coordinates."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    low, high = np.percentile(array[array > 0], [1.0, 99.5]) if (array > 0).any() else (0.0, 1.0)
    grey = np.clip((array - low) / max(high - low, 1e-6) * 255.0, 0, 255).astype(np.uint8)
    data = vtkImageData()
    nk, nj, ni = grey.shape
    data.SetDimensions(ni, nj, nk)
    data.SetSpacing(image.GetSpacing())
    data.SetOrigin(0.0, 0.0, 0.0)
    data.GetPointData().SetScalars(numpy_to_vtk(grey.ravel(), deep=True))
    affine = image_affine(image)
    matrix = affine.copy()
    matrix[:3, :3] = affine[:3, :3] / np.asarray(image.GetSpacing())  # the spacing is in the image data
    actors = []
    centre = (ni // 2, nj // 2, nk // 2)
    for axis in range(3):
        extent = [0, ni - 1, 0, nj - 1, 0, nk - 1]
        extent[2 * axis] = extent[2 * axis + 1] = centre[axis]
        actor = vtkImageActor()
        actor.GetMapper().SetInputData(data)
        actor.SetDisplayExtent(*extent)
        actor.SetUserMatrix(vtk_matrix(matrix))
        actors.append(actor)
    return actors


def vtk_matrix(matrix: np.ndarray):
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    result = vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            result.SetElement(row, column, float(matrix[row, column]))
    return result


def ellipsoid_actor(gaussians_path: Path, centre: np.ndarray) -> vtkActor:
    """The ellipsoids, without those in the octant around ``centre`` (3,) that faces the camera."""
    arrays = load_gaussians(gaussians_path)
    keep = ~np.all(np.sign(arrays["means"] - centre) == np.sign(VIEW_DIRECTION), axis=1)
    means, covariances, intensities = (arrays[key][keep] for key in ("means", "covariances", "intensities"))
    glyphs = ellipsoid_polydata(means, covariances, intensities, max_count=ELLIPSOIDS, scale=ELLIPSOID_SCALE)
    normals = vtkPolyDataNormals()
    normals.SetInputData(glyphs)
    mapper = vtkPolyDataMapper()
    mapper.SetInputConnection(normals.GetOutputPort())
    mapper.ScalarVisibilityOff()
    actor = vtkActor()
    actor.SetMapper(mapper)
    actor.GetProperty().SetColor(*ELLIPSOID_COLOUR)
    actor.GetProperty().SetOpacity(0.8)
    return actor


def render_view(image: sitk.Image, gaussians_path: Path) -> np.ndarray:
    """The 3-D panel (rows, cols, 3) uint8, rendered offscreen."""
    renderer = vtkRenderer()
    renderer.SetBackground(0.08, 0.08, 0.1)
    for actor in plane_actors(image):
        renderer.AddActor(actor)
    size = np.asarray(image.GetSize()) - 1
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in size // 2]))
    renderer.AddActor(ellipsoid_actor(gaussians_path, centre))
    window = vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*VIEW_SIZE)
    window.AddRenderer(renderer)
    camera = renderer.GetActiveCamera()
    camera.SetViewUp(0.0, 0.0, 1.0)  # LPS: superior up
    camera.SetFocalPoint(*centre)
    camera.SetPosition(*(centre + 500.0 * VIEW_DIRECTION))
    renderer.ResetCamera()
    camera.Zoom(1.3)
    window.Render()
    grab = vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    width, height, _ = grab.GetOutput().GetDimensions()
    pixels = vtk_to_numpy(grab.GetOutput().GetPointData().GetScalars()).reshape(height, width, -1)[..., :3]
    return np.ascontiguousarray(pixels[::-1])


def scaled_to_height(picture: np.ndarray, height: int) -> np.ndarray:
    rows = np.minimum((np.arange(height) * picture.shape[0] / height).astype(int), picture.shape[0] - 1)
    width = int(round(picture.shape[1] * height / picture.shape[0]))
    columns = np.minimum((np.arange(width) * picture.shape[1] / width).astype(int), picture.shape[1] - 1)
    return picture[np.ix_(rows, columns)]


def make_screenshot(run_dir: Path, out: Path) -> None:
    """The 3-D view beside the montage of the run in ``run_dir``, as one PNG."""
    image = sitk.ReadImage(str(run_dir / "volume.nii.gz"))
    view = render_view(image, run_dir / "gaussians.npz")
    with tempfile.TemporaryDirectory() as scratch:
        write_montage(image, Path(scratch) / "montage.png")
        montage = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(scratch) / "montage.png")))
    montage = np.repeat(scaled_to_height(montage, view.shape[0])[..., None], 3, axis=-1)
    gap = np.zeros((view.shape[0], 8, 3), dtype=np.uint8)
    write_png(np.concatenate([view, gap, montage.astype(np.uint8)], axis=1), out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a folder with volume.nii.gz and gaussians.npz")
    parser.add_argument("out", type=Path, help="the PNG to write")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    make_screenshot(args.run_dir, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
