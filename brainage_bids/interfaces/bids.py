"""Input validation and the derivatives sink."""
from __future__ import annotations

import json
import os

import nibabel as nib
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..utils.images import (
    atomic_copy,
    atomic_write_text,
    check_field_of_view,
    load_image,
    reorient_ras,
)


class _ValidateInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="BIDS input image")


class _ValidateOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="validated image, float32, RAS voxel order")
    zooms = traits.List(traits.Float)


class ValidateImage(SimpleInterface):
    """Check an input scan (see :func:`load_image`; its field of view must hold a brain, see
    :func:`check_field_of_view`) and reorient it to RAS."""

    input_spec = _ValidateInputSpec
    output_spec = _ValidateOutputSpec

    def _run_interface(self, runtime):
        img = reorient_ras(load_image(self.inputs.in_file))
        check_field_of_view(img, self.inputs.in_file)
        out = os.path.join(runtime.cwd, "input_ras.nii.gz")
        nib.save(img, out)
        self._results.update(out_file=out, zooms=[float(z) for z in img.header.get_zooms()[:3]])
        return runtime


class _SinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    out_path = traits.Str(mandatory=True, desc="absolute path of the derivative")
    metadata = traits.Dict(desc="JSON sidecar written next to the derivative when given")
    sidecar_file = File(exists=True, desc="JSON file merged into the sidecar (after metadata)")
    after = traits.Any(desc="an output of a later step of the scan (its prediction); connected, "
                            "it holds the sink back until that step succeeded, so a scan that "
                            "fails later publishes nothing")


class _SinkOutputSpec(TraitedSpec):
    out_file = traits.Str()


class DerivativesSink(SimpleInterface):
    """Copy a result to its derivative path atomically, with an optional JSON sidecar."""

    input_spec = _SinkInputSpec
    output_spec = _SinkOutputSpec

    def _run_interface(self, runtime):
        out = self.inputs.out_path
        atomic_copy(self.inputs.in_file, out)
        meta = dict(self.inputs.metadata) if isdefined(self.inputs.metadata) else {}
        if isdefined(self.inputs.sidecar_file):
            with open(self.inputs.sidecar_file) as fh:
                meta.update(json.load(fh))
        if meta:
            stem = out[: -len(".nii.gz")] if out.endswith(".nii.gz") else os.path.splitext(out)[0]
            atomic_write_text(stem + ".json", json.dumps(meta, indent=2) + "\n")
        self._results["out_file"] = out
        return runtime
