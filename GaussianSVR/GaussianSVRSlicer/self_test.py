"""The module's self-test inside Slicer (GaussianSVRTest calls these): a tiny phantom as three orthogonal
stacks, the panel and the presets, a reconstruction on the CPU with a few iterations, and a cancel.

Needs Slicer (it builds volume nodes with slicer.util and uses the module's widget); the engine needs
torch, which the Extension Index's build machines do not have: ``missing_engine`` says so, and the test
then skips.
"""

from __future__ import annotations

import time

import slicer

from . import deps, params, phantom
from .inputs import StackInput
from .run_state import Outcome
from .session import GlyphStyle, Request


def missing_engine() -> str | None:
    """Why the engine cannot run here (no PyTorch), or None."""
    if deps.probe().torch is None:
        return "PyTorch is not installed (install the PyTorch extension): the reconstruction test is skipped"
    return None


def phantom_request(iterations: int) -> Request:
    """Three orthogonal 16 x 16 x 10 stacks of the phantom, a mask on the first; tiny CPU settings."""
    stacks = []
    for index, (voxels, ijk_to_ras) in enumerate(
        phantom.orthogonal_stacks(fov_mm=40.0, in_plane_mm=2.5, slice_mm=4.0)
    ):
        name = f"phantom stack {index + 1}"
        node = slicer.util.addVolumeFromArray(voxels, ijkToRAS=ijk_to_ras, name=name)
        mask = None
        if index == 0:
            mask = slicer.util.addVolumeFromArray(
                phantom.head_mask(voxels), ijkToRAS=ijk_to_ras, name=f"{name} mask",
                nodeClassName="vtkMRMLLabelMapVolumeNode",
            )  # fmt: skip
        stacks.append(StackInput(node, mask, float(node.GetSpacing()[2])))
    settings = {spec.name: spec.default for spec in params.ENGINE_SETTINGS}
    settings.update(preset=params.Preset.PREVIEW, nGaussians=500, kNeighbours=8, iterations=iterations,
                    device=params.Device.CPU, outputResolution=2.5, previewInterval=1.0)  # fmt: skip
    return Request(stacks=stacks, settings=settings, glyphs=GlyphStyle(1.0, 300, True))


def check_panel(test, widget) -> None:
    """The stack table writes the parameter node, Use leaves a stack out, a preset fills the settings."""
    volumes = [stack.volume for stack in phantom_request(iterations=10).stacks]
    widget.table.set_rows([])
    for volume in volumes:
        widget.table.add_row(volume)
    p = widget.parameters
    test.assertEqual([node.GetID() for node in p.stacks], [node.GetID() for node in volumes])
    test.assertEqual(list(p.thicknesses), [4.0, 4.0, 4.0])  # prefilled from the slice spacing
    p.includeStacks = [True, False, True]
    test.assertEqual([row.include for row in widget.table.rows()], [True, False, True])
    test.assertEqual(len(widget.logic.request(p).stacks), 2)
    p.preset = params.Preset.HIGH
    test.assertEqual(p.kNeighbours, params.PRESETS[params.Preset.HIGH]["kNeighbours"])
    test.assertEqual(widget.ui.kNeighboursSpinBox.value, p.kNeighbours)
    test.assertTrue(widget.ui.applyButton.enabled)


def check_reconstruction(test, logic) -> None:
    """The phantom reconstructed: a volume around the origin, ellipsoids and a report."""
    run = logic.start(phantom_request(iterations=10))
    state = run.wait(timeout_s=600, process_events=slicer.app.processEvents)
    test.assertEqual(state.outcome, Outcome.DONE, state.failure_details())
    voxels = slicer.util.arrayFromVolume(run.output_volume)
    test.assertGreater(float(voxels.max()), 0.0)
    bounds = [0.0] * 6
    run.output_volume.GetRASBounds(bounds)
    for axis in range(3):  # the phantom is centred on the RAS origin
        test.assertLess(bounds[2 * axis], 0.0)
        test.assertGreater(bounds[2 * axis + 1], 0.0)
    test.assertGreater(run.gaussians_model.GetMesh().GetNumberOfPoints(), 0)
    test.assertEqual(len(run.report["stacks"]), 3)
    test.assertIsNone(run.clean_up())


def check_cancel(test, logic) -> None:
    """A long run cancelled after two iterations ends as cancelled, its worker gone."""
    run = logic.start(phantom_request(iterations=5000))
    deadline = time.monotonic() + 300
    while run.state.iteration < 2 and not run.finished and time.monotonic() < deadline:
        run.poll()
        slicer.app.processEvents()
        time.sleep(0.1)
    logic.cancel()
    state = run.wait(timeout_s=120, process_events=slicer.app.processEvents)
    test.assertEqual(state.outcome, Outcome.CANCELLED, state.failure_details())
    test.assertFalse(run.worker.running)
    run.clean_up()
