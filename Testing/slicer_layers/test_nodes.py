"""MRML helpers with the real slicer-core wheel: engine files -> nodes (exact RAS geometry, reused
nodes, ellipsoids), nodes -> worker files, undoing a failed run, and a whole session with the engine."""

from __future__ import annotations

import logging
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from GaussianSVRSlicer import command, inputs, nodes, params, phantom, session
from GaussianSVRSlicer.run_state import EXIT_NOT_ALIGNED, Outcome
from scipy.spatial.transform import Rotation
from slicer_helpers import TINY_PHANTOM, TINY_SETTINGS

from GaussianSVRLib.io import progress

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def oblique_image(values_offset: float = 0.0) -> sitk.Image:
    voxels = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7) + values_offset
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((3.0, -4.0, 5.0))
    rotation = Rotation.from_rotvec(np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0) * 0.35).as_matrix()
    image.SetDirection(rotation.ravel().tolist())
    return image


def lps_affine(image: sitk.Image) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return affine


def ijk_to_ras(node) -> np.ndarray:
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def slicer_reads(path: Path, scene):
    """The same file read by Slicer's own volume storage node (the reference for geometry)."""
    import slicer

    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    assert storage.ReadData(node)
    return node


def write_gaussians(path: Path, means_lps, covariances_lps, intensities) -> Path:
    np.savez(
        path, means=means_lps, covariances=covariances_lps, intensities=intensities, space=np.array("LPS")
    )
    return path


# -- checkpoint volume -> volume node ------------------------------------------------------------------


@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd"])
def test_checkpoint_volume_gets_exact_oblique_geometry(scene, tmp_path, extension):
    import slicer

    path = tmp_path / f"preview{extension}"
    sitk.WriteImage(oblique_image(), str(path))
    written = sitk.ReadImage(str(path))  # the file's own precision (NIfTI stores float32)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    nodes.load_volume_into(node, path)

    np.testing.assert_allclose(ijk_to_ras(node), LPS_TO_RAS @ lps_affine(written), atol=1e-9)
    np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(slicer_reads(path, scene)), atol=1e-5)
    voxels = slicer.util.arrayFromVolume(node)
    for i, j, k in [(0, 0, 0), (6, 0, 0), (0, 5, 0), (0, 0, 4), (3, 2, 1)]:
        lps = np.asarray(written.TransformIndexToPhysicalPoint((i, j, k)))
        np.testing.assert_allclose(
            ijk_to_ras(node) @ [i, j, k, 1.0], [-lps[0], -lps[1], lps[2], 1.0], atol=1e-9
        )
        assert voxels[k, j, i] == written.GetPixel(i, j, k)
    assert node.GetDisplayNode() is not None


def test_repeated_checkpoints_update_the_same_volume_node(scene, tmp_path):
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "output")
    first, second = tmp_path / "a.nrrd", tmp_path / "b.nrrd"
    sitk.WriteImage(oblique_image(), str(first))
    moved = oblique_image(values_offset=1000.0)
    moved.SetOrigin((10.0, 11.0, 12.0))
    sitk.WriteImage(moved, str(second))

    nodes.load_volume_into(node, first)
    count = scene.GetNumberOfNodes()
    nodes.load_volume_into(node, second)

    assert scene.GetNumberOfNodes() == count
    assert slicer.util.arrayFromVolume(node).min() == 1000.0
    np.testing.assert_allclose(ijk_to_ras(node)[:3, 3], [-10.0, -11.0, 12.0])


# -- Gaussians -> ellipsoid model node -------------------------------------------------------------------


def test_gaussians_become_ellipsoids_in_ras(tmp_path):
    from vtk.util.numpy_support import vtk_to_numpy

    rotation = Rotation.from_rotvec([0.3, -0.5, 0.8]).as_matrix()
    covariance = rotation @ np.diag([4.0, 1.0, 0.25]) @ rotation.T
    means = np.array([[10.0, 20.0, 30.0], [-5.0, 0.0, 2.0]])
    path = write_gaussians(tmp_path / "g.npz", means, np.stack([covariance, np.eye(3)]), np.array([2.0, 1.0]))
    gaussians = nodes.read_gaussians(path)
    surface = nodes.ellipsoid_polydata(gaussians, scale=1.0, max_count=10)
    xyz = vtk_to_numpy(surface.GetPoints().GetData())
    per_glyph = len(xyz) // 2
    first = xyz[:per_glyph]  # the larger-mass Gaussian comes first
    mean_ras = means[0] * [-1, -1, 1]
    covariance_ras = covariance * np.outer([-1, -1, 1], [-1, -1, 1])
    np.testing.assert_allclose(first.mean(axis=0), mean_ras, atol=1e-5)
    offsets = first - mean_ras
    mahalanobis = np.einsum("pi,ij,pj->p", offsets, np.linalg.inv(covariance_ras), offsets)
    np.testing.assert_allclose(mahalanobis, 1.0, rtol=1e-5)  # every vertex on the 1-sigma ellipsoid (float32)
    half = nodes.ellipsoid_polydata(gaussians, scale=0.5, max_count=10)
    half_first = vtk_to_numpy(half.GetPoints().GetData())[:per_glyph] - mean_ras
    np.testing.assert_allclose(
        np.einsum("pi,ij,pj->p", half_first, np.linalg.inv(covariance_ras), half_first), 0.25, rtol=1e-5
    )


def test_model_node_is_shown_in_3d_and_slices_and_reused(scene, tmp_path):
    path = write_gaussians(tmp_path / "g.npz", np.zeros((3, 3)), np.tile(np.eye(3), (3, 1, 1)), np.ones(3))
    gaussians = nodes.read_gaussians(path)
    model = scene.AddNewNodeByClass("vtkMRMLModelNode")
    nodes.update_model_node(model, nodes.ellipsoid_polydata(gaussians, 1.0, 3))
    display = model.GetDisplayNode()
    assert display is not None and display.GetVisibility2D() and display.GetVisibility()
    count, points = scene.GetNumberOfNodes(), model.GetMesh().GetNumberOfPoints()

    nodes.update_model_node(model, nodes.ellipsoid_polydata(gaussians, 1.0, 1))
    nodes.set_model_visibility(model, False)
    assert scene.GetNumberOfNodes() == count and model.GetDisplayNode() is display
    assert model.GetMesh().GetNumberOfPoints() == points // 3
    assert not display.GetVisibility()


def test_gaussians_in_an_unknown_space_are_refused(tmp_path):
    path = tmp_path / "g.npz"
    np.savez(
        path,
        means=np.zeros((1, 3)),
        covariances=np.eye(3)[None],
        intensities=np.ones(1),
        space=np.array("XYZ"),
    )
    with pytest.raises(ValueError, match="XYZ"):
        nodes.read_gaussians(path)


# -- nodes -> worker files --------------------------------------------------------------------------------


def test_exported_stack_keeps_world_geometry_under_a_linear_transform(scene, tmp_path):
    import slicer

    voxels, matrix = phantom.orthogonal_stacks()[1]
    oblique = matrix.copy()
    oblique[:3, :3] = Rotation.from_rotvec([0.1, 0.2, -0.3]).as_matrix() @ matrix[:3, :3]
    stack = slicer.util.addVolumeFromArray(voxels, ijkToRAS=oblique, name="coronal")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    to_parent = np.eye(4)
    to_parent[:3, :3] = Rotation.from_rotvec([0.0, 0.0, 0.4]).as_matrix()
    to_parent[:3, 3] = [5.0, -2.0, 7.0]
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_parent))
    stack.SetAndObserveTransformNodeID(transform.GetID())

    labels = slicer.util.addVolumeFromArray(
        (voxels > 0).astype(np.uint8), ijkToRAS=oblique, nodeClassName="vtkMRMLLabelMapVolumeNode"
    )
    labels.SetAndObserveTransformNodeID(transform.GetID())
    files, masked = inputs.export_stacks(
        [inputs.StackInput(stack, None, 3.0), inputs.StackInput(stack, labels, 3.0)], tmp_path
    )
    assert files.mask is None and files.thickness == 3.0 and masked.mask is not None
    written = sitk.ReadImage(str(files.image))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), voxels)
    world = to_parent @ oblique
    for i, j, k in [(0, 0, 0), (31, 0, 0), (0, 31, 15), (7, 9, 11)]:
        lps = written.TransformIndexToPhysicalPoint((i, j, k))
        np.testing.assert_allclose([-lps[0], -lps[1], lps[2]], (world @ [i, j, k, 1.0])[:3], atol=1e-9)


def test_a_non_linear_parent_transform_is_refused(scene):
    import slicer
    import vtk

    voxels, matrix = phantom.orthogonal_stacks()[0]
    stack = slicer.util.addVolumeFromArray(voxels, ijkToRAS=matrix, name="axial")
    spline = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for point in [(0, 0, 0), (10, 0, 0), (0, 10, 0), (0, 0, 10)]:
        source.InsertNextPoint(point)
        target.InsertNextPoint([c + (1.0 if c else 0.0) for c in point])
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    transform = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    transform.SetAndObserveTransformToParent(spline)
    stack.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(inputs.InputProblem, match="Harden transform"):
        inputs.volume_to_image(stack)


def test_segmentation_and_label_map_masks(scene, tmp_path):
    import slicer

    stacks = []
    for index, (voxels, matrix) in enumerate(phantom.orthogonal_stacks()[:2]):
        stacks.append(slicer.util.addVolumeFromArray(voxels, ijkToRAS=matrix, name=f"stack{index}"))
    labels = (slicer.util.arrayFromVolume(stacks[0]) > 50).astype(np.uint8)
    labelmap = slicer.util.addVolumeFromArray(
        labels, ijkToRAS=phantom.orthogonal_stacks()[0][1], nodeClassName="vtkMRMLLabelMapVolumeNode"
    )
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)

    rows = [inputs.StackInput(stacks[0], segmentation, 3.0), inputs.StackInput(stacks[1], None, 3.0)]
    files = inputs.export_stacks(rows, tmp_path)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(files[0].mask)))
    np.testing.assert_array_equal(mask, labels)  # on the stack's grid, same voxels
    assert files[1].mask is None  # the engine propagates the first mask to it

    files = inputs.export_stacks([inputs.StackInput(stacks[0], labelmap, 3.0)], tmp_path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(files[0].mask))), labels)


def test_input_problems_are_reported_before_any_run(scene, tmp_path):
    import slicer

    voxels, matrix = phantom.orthogonal_stacks()[0]
    stack = slicer.util.addVolumeFromArray(voxels, ijkToRAS=matrix)
    with pytest.raises(inputs.InputProblem, match="at least one stack"):
        inputs.export_stacks([], tmp_path)
    with pytest.raises(inputs.InputProblem, match="thickness"):
        inputs.export_stacks([inputs.StackInput(stack, None, 0.0)], tmp_path)
    assert inputs.default_thickness(stack) == pytest.approx(3.0)
    # No mask is needed: a box or the engine's brain search finds the brain.
    files = inputs.export_stacks([inputs.StackInput(stack, None, 3.0)], tmp_path)
    assert files[0].mask is None and files[0].image.is_file()


def test_an_roi_node_reaches_the_engine_as_the_same_box(scene, tmp_path):
    """The ROI the user placed, exported for --roi-from: the engine's box holds exactly the points
    that Slicer says are in the ROI; an ROI under a transform is refused."""
    import vtk

    from GaussianSVRLib.io.roi import read_slicer_roi

    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "brain box")
    matrix = vtk.vtkMatrix4x4()
    rotation = Rotation.from_rotvec([-0.2, 0.6, 0.3]).as_matrix()
    for i in range(3):
        for j in range(3):
            matrix.SetElement(i, j, rotation[i, j])
    matrix.SetElement(0, 3, -8.0)
    roi.SetAndObserveObjectToNodeMatrix(matrix)
    roi.SetSize(60.0, 45.0, 50.0)
    box = read_slicer_roi(inputs.export_roi(roi, tmp_path))
    points_ras = np.random.default_rng(2).uniform(-40, 40, (300, 3))
    slicer_says = np.array([roi.IsPointInROIWorld(tuple(p)) for p in points_ras])
    assert 30 < slicer_says.sum() < 270
    np.testing.assert_array_equal(box.contains(points_ras * [-1.0, -1.0, 1.0]), slicer_says)
    assert not scene.GetNodesByClass("vtkMRMLMarkupsROIJsonStorageNode").GetNumberOfItems()
    roi.SetAndObserveTransformNodeID(scene.AddNewNodeByClass("vtkMRMLLinearTransformNode").GetID())
    with pytest.raises(inputs.InputProblem, match="harden"):
        inputs.export_roi(roi, tmp_path)


# -- undoing a failed run ---------------------------------------------------------------------------------


def test_scene_changes_rollback_restores_the_scene(scene, tmp_path):
    import slicer

    existing = slicer.util.addVolumeFromArray(
        np.full((2, 3, 4), 7.0, dtype=np.float32), ijkToRAS=np.diag([2, 2, 2, 1.0])
    )
    before = scene.GetNumberOfNodes()
    changes = nodes.SceneChanges(scene)
    changes.will_modify(existing)
    path = tmp_path / "v.nrrd"
    sitk.WriteImage(oblique_image(), str(path))
    nodes.load_volume_into(existing, path)
    created = scene.AddNewNodeByClass("vtkMRMLModelNode")
    changes.created(created)

    changes.rollback()
    assert scene.GetNumberOfNodes() == before and not scene.IsNodePresent(created)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(existing), 7.0)
    np.testing.assert_allclose(ijk_to_ras(existing), np.diag([2, 2, 2, 1.0]))


# -- a whole session -------------------------------------------------------------------------------------


def tiny_request(scene, **changes) -> session.Request:
    import slicer

    stacks = []
    for index, (voxels, matrix) in enumerate(phantom.orthogonal_stacks(**TINY_PHANTOM)):
        node = slicer.util.addVolumeFromArray(voxels, ijkToRAS=matrix, name=f"stack {index}")
        mask = None
        if index == 0:  # the engine propagates it to the other stacks
            mask = slicer.util.addVolumeFromArray(
                phantom.head_mask(voxels), ijkToRAS=matrix, nodeClassName="vtkMRMLLabelMapVolumeNode"
            )
        stacks.append(inputs.StackInput(node, mask, TINY_PHANTOM["slice_mm"]))
    settings = {spec.name: spec.default for spec in params.ENGINE_SETTINGS}
    settings.update(TINY_SETTINGS, preset=params.Preset.PREVIEW, device=params.Device.CPU)
    request = session.Request(stacks=stacks, settings=settings, glyphs=session.GlyphStyle(1.0, 300, True))
    for key, value in changes.items():
        setattr(request, key, value)
    return request


def test_session_with_the_engine_fills_the_output_nodes_and_saves_the_files(scene, tmp_path):
    import slicer

    shown = []
    saved_dir = tmp_path / "saved"
    saved_dir.mkdir()
    request = tiny_request(scene, output_folder=saved_dir)
    run = session.ReconstructionSession(
        scene, request, tmp_path / "run", python=[sys.executable], on_first_preview=shown.append
    )
    run.start()
    state = run.wait(timeout_s=240)
    assert state.outcome is Outcome.DONE, state.failure_details()
    volume, model = run.output_volume, run.gaussians_model
    assert shown == [volume] and run.previews_shown >= 2  # a live preview, then the result
    voxels = slicer.util.arrayFromVolume(volume)
    assert voxels.max() > 0
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    assert all(bounds[2 * a] < 0.0 < bounds[2 * a + 1] for a in range(3))  # the phantom is at the origin
    assert 0 < model.GetMesh().GetNumberOfPoints()
    assert model.GetDisplayNode().GetVisibility2D()
    assert len(run.report["stacks"]) == 3
    name = command.safe_file_name(volume.GetName())
    assert sorted(p.name for p in saved_dir.iterdir()) == sorted(
        [
            f"{name}.nii.gz",
            f"{name}_gaussians.vtp",
            f"{name}_gaussians.npz",
            f"{name}_report.json",
            f"{name}_qc.png",
        ]
    )
    assert run.qc_picture == saved_dir / f"{name}_qc.png"
    assert run.continuable_gaussians == saved_dir / f"{name}_gaussians.npz"

    run.restyle_gaussians(session.GlyphStyle(0.5, 10, True))
    per_glyph = model.GetMesh().GetNumberOfPoints() // 10
    assert per_glyph > 0 and model.GetMesh().GetNumberOfPoints() == 10 * per_glyph
    run.restyle_gaussians(session.GlyphStyle(0.5, 10, False))
    assert not model.GetDisplayNode().GetVisibility()


def test_standard_space_carries_scanner_nodes_onto_the_atlas_volume(scene):
    """A point of a stack under the transform lands, in RAS, where the atlas-space volume has that
    anatomy: the report's atlas-to-scanner map (LPS) inverted."""
    import slicer

    atlas_to_scanner = np.eye(4)
    atlas_to_scanner[:3, :3] = Rotation.from_rotvec([0.4, -0.7, 1.1]).as_matrix()
    atlas_to_scanner[:3, 3] = [12.0, -30.0, 5.0]
    stack = slicer.util.addVolumeFromArray(np.ones((3, 4, 5), np.float32), name="stack")
    transform = nodes.place_under_transform(
        scene, "to standard", nodes.scanner_to_standard_ras(atlas_to_scanner), [stack]
    )
    assert stack.GetTransformNodeID() == transform.GetID()
    atlas_lps = np.array([10.0, 20.0, -15.0])
    scanner_ras = nodes.LPS_TO_RAS[:3, :3] @ (atlas_to_scanner[:3, :3] @ atlas_lps + atlas_to_scanner[:3, 3])
    world = transform.GetTransformToParent().TransformPoint(tuple(scanner_ras))
    np.testing.assert_allclose(world, nodes.LPS_TO_RAS[:3, :3] @ atlas_lps, atol=1e-6)


def test_a_run_in_standard_planes_lines_the_stacks_up_with_the_result(scene, tmp_path):
    shown = []
    request = tiny_request(scene)
    request.settings = dict(request.settings, outputSpace=params.OutputSpace.ATLAS)
    run = session.ReconstructionSession(
        scene, request, tmp_path / "run", python=[sys.executable], on_first_preview=shown.append
    )
    run.start()
    state = run.wait(timeout_s=240)
    assert state.outcome is Outcome.DONE, state.failure_details()
    matrix = np.asarray(run.report["standard_space"]["atlas_to_scanner"])
    (transform,) = scene.GetNodesByClass("vtkMRMLLinearTransformNode")
    import slicer

    to_parent = slicer.util.arrayFromTransformMatrix(transform)
    np.testing.assert_allclose(to_parent, nodes.scanner_to_standard_ras(matrix), atol=1e-9)
    under = [stack.volume for stack in request.stacks] + [request.stacks[0].mask, run.gaussians_model]
    assert all(node.GetTransformNodeID() == transform.GetID() for node in under)
    assert run.output_volume.GetTransformNodeID() is None
    assert shown == [run.output_volume, run.output_volume]  # the views turn again, to the standard planes


def test_a_run_continues_from_the_kept_gaussians_of_the_last_one(scene, tmp_path):
    import slicer

    request = tiny_request(scene)
    request.settings = {**request.settings, "iterations": 80}
    first = session.ReconstructionSession(scene, request, tmp_path / "r1", python=[sys.executable])
    first.start()
    assert first.wait(timeout_s=240).outcome is Outcome.DONE, first.state.failure_details()
    kept = session.copy_atomically(first.continuable_gaussians, tmp_path / "kept" / "last.npz")
    shutil.rmtree(tmp_path / "r1")  # the module removes the work folder; the kept copy must suffice
    results = {}
    for label, init in (("continued", kept), ("fresh", None)):
        request = tiny_request(scene, init_gaussians=init)
        request.settings = {**request.settings, "iterations": 5}
        run = session.ReconstructionSession(scene, request, tmp_path / label, python=[sys.executable])
        run.start()
        assert run.wait(timeout_s=240).outcome is Outcome.DONE, run.state.failure_details()
        results[label] = run
    continued, fresh = results["continued"], results["fresh"]
    assert continued.report["settings"]["init_gaussians"] == str(kept)
    assert fresh.report["settings"]["init_gaussians"] is None
    reference = slicer.util.arrayFromVolume(first.output_volume).ravel()

    def agreement(run) -> float:
        voxels = slicer.util.arrayFromVolume(run.output_volume).ravel()
        return float(np.corrcoef(reference, voxels)[0, 1]) if voxels.shape == reference.shape else 0.0

    # Five steps from the last result stay close to it; five steps from scratch do not get there.
    assert agreement(continued) > 0.95 > agreement(fresh)


def test_a_second_run_reuses_the_same_nodes(scene, tmp_path):
    import slicer

    volume, gaussians = preview_files(tmp_path)
    report_path = tmp_path / "report.json"
    report_path.write_text('{"stacks": [], "slices": []}', encoding="utf-8")
    lines = [
        progress.encode("started", device="cpu", total=10),
        progress.encode("checkpoint", iter=1, volume=volume, gaussians=gaussians, ellipsoids=None),
        progress.encode("done", volume=volume, gaussians=gaussians, report=str(report_path), elapsed_s=1.0),
    ]
    first = session.ReconstructionSession(
        scene, tiny_request(scene), tmp_path / "r1", python=scripted_worker(tmp_path, lines, 0)
    )
    first.start()
    assert first.wait(timeout_s=30).outcome is Outcome.DONE
    output, model = first.output_volume, first.gaussians_model
    again = tiny_request(scene, output_volume=output, gaussians_model=model)
    count = scene.GetNumberOfNodes()
    second = session.ReconstructionSession(
        scene, again, tmp_path / "r2", python=scripted_worker(tmp_path, lines, 0)
    )
    second.start()
    assert second.wait(timeout_s=30).outcome is Outcome.DONE
    assert second.output_volume is output and second.gaussians_model is model
    assert scene.GetNumberOfNodes() == count
    assert slicer.util.arrayFromVolume(output).shape == (5, 6, 7) and second.report == {
        "stacks": [],
        "slices": [],
    }


def scripted_worker(tmp_path: Path, messages: list[str], exit_code: int) -> list[str]:
    """A worker that prints the given protocol lines, logs a line and exits with ``exit_code``."""
    script = tmp_path / "scripted.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            for line in {messages!r}:
                print(line, flush=True)
                time.sleep(0.2)
            print("about to exit", file=sys.stderr, flush=True)
            sys.exit({exit_code})
            """
        ),
        encoding="utf-8",
    )
    return [sys.executable, str(script)]


def run_scripted(scene, tmp_path, messages, exit_code):
    """A session (not started) with an existing output volume and a scripted worker: (run, output)."""
    import slicer

    output = slicer.util.addVolumeFromArray(np.full((2, 3, 4), 5.0, dtype=np.float32), name="previous result")
    request = tiny_request(scene, output_volume=output)
    worker = scripted_worker(tmp_path, messages, exit_code)
    run = session.ReconstructionSession(scene, request, tmp_path / "r", python=worker, preview_interval_s=0)
    return run, output


def preview_files(tmp_path: Path) -> tuple[str, str]:
    sitk.WriteImage(oblique_image(), str(tmp_path / "preview.nrrd"))
    write_gaussians(tmp_path / "g.npz", np.zeros((2, 3)), np.tile(np.eye(3), (2, 1, 1)), np.ones(2))
    return str(tmp_path / "preview.nrrd"), str(tmp_path / "g.npz")


def test_a_crashing_worker_leaves_the_scene_as_it_was(scene, tmp_path):
    import slicer

    volume, gaussians = preview_files(tmp_path)
    lines = [
        progress.encode("started", device="cpu", total=10),
        progress.encode("checkpoint", iter=1, volume=volume, gaussians=gaussians, ellipsoids=None),
    ]
    run, output = run_scripted(scene, tmp_path, lines, exit_code=1)
    before = scene.GetNumberOfNodes()
    run.start()
    while run.previews_shown == 0 and not run.finished:
        run.poll()
    assert slicer.util.arrayFromVolume(output).shape == (5, 6, 7)  # the preview was shown
    state = run.wait(timeout_s=30)

    assert state.outcome is Outcome.FAILED and state.returncode == 1
    assert "about to exit" in state.failure_details()
    assert scene.GetNumberOfNodes() == before
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(output), 5.0)
    assert run.output_volume is output and run.gaussians_model is None


def test_a_failed_run_keeps_its_work_folder_and_logs_the_worker(scene, tmp_path, caplog):
    lines = [
        progress.encode("started", device="cpu", total=10),
        progress.encode("error", message="bad stack"),
    ]
    run, _ = run_scripted(scene, tmp_path, lines, exit_code=2)
    with caplog.at_level(logging.INFO, logger="GaussianSVR.worker"):
        run.start()
        state = run.wait(timeout_s=30)
    assert state.outcome is Outcome.BAD_INPUT
    assert run.clean_up() == run.work_dir and (run.work_dir / "stack_00.nrrd").is_file()
    logged = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert ("INFO", "about to exit") in logged and ("ERROR", "bad stack") in logged


def test_a_finished_run_removes_its_work_folder(scene, tmp_path):
    run, _ = run_scripted(scene, tmp_path, [progress.encode("started", device="cpu", total=1)], exit_code=0)
    run.start()
    run.wait(timeout_s=30)
    assert run.state.outcome is Outcome.FAILED  # exit 0 without a "done" message is no success either
    assert run.clean_up() == run.work_dir
    (tmp_path / "b").mkdir()
    run, _ = run_scripted(scene, tmp_path / "b", [progress.encode("started", device="cpu", total=1)], 0)
    run.start()
    run.cancel()
    run.wait(timeout_s=30)
    assert run.clean_up() is None and not run.work_dir.exists()


def test_saving_to_a_folder_needs_a_chosen_existing_folder(tmp_path):
    assert session.output_folder(False, "") is None and session.output_folder(False, None) is None
    for unchosen in ("", ".", None, "   "):
        with pytest.raises(inputs.InputProblem, match="no folder is chosen"):
            session.output_folder(True, unchosen)
    with pytest.raises(inputs.InputProblem, match="does not exist"):
        session.output_folder(True, tmp_path / "missing")
    with pytest.raises(inputs.InputProblem, match="does not exist"):
        session.output_folder(True, "relative/folder")
    assert session.output_folder(True, str(tmp_path)) == tmp_path


def test_a_result_whose_stacks_were_not_brought_together_is_loaded_and_flagged(scene, tmp_path):
    import slicer

    volume, gaussians = preview_files(tmp_path)
    verdict = "the stacks could not be brought together: 2 of 3 stacks agree poorly with the volume"
    lines = [
        progress.encode("started", device="cpu", total=10),
        progress.encode(
            "done", volume=volume, gaussians=None, report=None, elapsed_s=1, aligned=False, verdict=verdict
        ),
    ]
    run, output = run_scripted(scene, tmp_path, lines, exit_code=EXIT_NOT_ALIGNED)
    run.start()
    state = run.wait(timeout_s=30)
    assert state.outcome is Outcome.NOT_ALIGNED
    assert state.status_text() == f"Finished on cpu in 1 s, but {verdict}"
    assert slicer.util.arrayFromVolume(run.output_volume).shape == (5, 6, 7)  # the result was loaded
    assert run.clean_up() is None


def test_a_result_that_cannot_be_loaded_is_a_failure(scene, tmp_path):
    import slicer

    volume, gaussians = preview_files(tmp_path)
    lines = [
        progress.encode("started", device="cpu", total=10),
        progress.encode("checkpoint", iter=1, volume=volume, gaussians=gaussians, ellipsoids=None),
        progress.encode(
            "done", volume=str(tmp_path / "missing.nii.gz"), gaussians=None, report=None, elapsed_s=1
        ),
    ]
    run, output = run_scripted(scene, tmp_path, lines, exit_code=0)
    before = scene.GetNumberOfNodes()
    run.start()
    state = run.wait(timeout_s=30)
    assert state.outcome is Outcome.FAILED and "could not be loaded" in state.failure_summary()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(output), 5.0)
    assert scene.GetNumberOfNodes() == before  # the model node made for the preview is gone


def test_a_worker_of_another_protocol_version_is_stopped(scene, tmp_path):
    script = tmp_path / "old.py"
    script.write_text(
        "import json, time\n"
        "print(json.dumps({'v': 0, 'type': 'started'}), flush=True)\n"
        "for _ in range(600):\n"
        "    time.sleep(0.1)\n",
        encoding="utf-8",
    )
    run = session.ReconstructionSession(
        scene, tiny_request(scene), tmp_path / "run", python=[sys.executable, str(script)], grace_s=0.5
    )
    run.start()
    state = run.wait(timeout_s=30)
    assert state.outcome is Outcome.FAILED and "protocol version 0" in state.failure_summary()
    assert run.worker.killed  # it ignored the cancel


def test_stop_ends_a_running_session_at_once(scene, tmp_path):
    """What closing the scene or Slicer does: the worker is gone and the session finished."""
    lines = [progress.encode("started", device="cpu", total=10)] + ["still working"] * 300
    run, output = run_scripted(scene, tmp_path, lines, exit_code=0)
    run.grace_s = 0.3
    run.start()
    run.wait(timeout_s=1.0)
    assert not run.finished
    run.stop(timeout_s=0.3)
    assert run.finished and not run.worker.running
    assert run.state.outcome is Outcome.CANCELLED and run.state.status_text().startswith("Cancelled")
