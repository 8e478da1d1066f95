#!/usr/bin/env python
"""Build a one-subject BIDS dataset to try brainage-bids without downloading anything.

The single T1w image is the MNI152 ICBM 2009a symmetric template that nilearn bundles in its wheel,
at 1 mm, with its affine rotated by a few degrees and shifted by a few millimetres so that the affine
registration to MNI space has real work to do. That template is already brain-extracted, so run the
example with ``--skull-strip none``::

    python scripts/make_example_dataset.py /tmp/example
    brainage-bids /tmp/example /tmp/example-out participant --skull-strip none

The predicted age of a population-average template is a smoke test of the pipeline, not a result.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from brainage_bids.utils.images import rotation

AGE = 30.0  # the ICBM152 2009 template averages young adults
ROTATION_DEG = (4.0, -3.0, 6.0)  # about x, y, z (world axes, through the origin)
SHIFT_MM = (6.0, -9.0, 12.0)

README = """\
brainage-bids example dataset
=============================

One synthetic participant (sub-01) made by scripts/make_example_dataset.py of brainage-bids.

sub-01/anat/sub-01_T1w.nii.gz is the MNI152 ICBM 2009a nonlinear symmetric T1 template as bundled
with nilearn (version {nilearn_version}, file {source}):
brain-extracted, 1 mm, intensities scaled to 0-1000 and stored as int16. Its affine was rotated by
{rotation} degrees about the x, y and z axes and shifted by {shift} mm, so the image no
longer lies on the MNI grid and the registration step has to recover the transform.
No scan of a real person is included.

The template is a population average of young adults; participants.tsv gives it an age of
{age:g} years for illustration only. Run brainage-bids on this dataset with --skull-strip none,
since the image is already brain-extracted.

Template: Fonov et al., NeuroImage 2011 and 2009 (ICBM 2009a nonlinear symmetric), Copyright
McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University; distributed
with nilearn under the terms given in nilearn's documentation.
"""


def moved_template() -> tuple[nib.Nifti1Image, str, str]:
    """The bundled 1 mm template with a moved affine; also nilearn's version and the source name."""
    import nilearn
    from nilearn.datasets import load_mni152_template

    tpl = load_mni152_template(resolution=1)
    data = np.asarray(tpl.get_fdata(), dtype=np.float32)
    data = np.clip(data, 0, None)
    data = np.round(1000.0 * data / float(data.max())).astype(np.int16)
    move = rotation(ROTATION_DEG)
    move[:3, 3] = SHIFT_MM
    img = nib.Nifti1Image(data, move @ tpl.affine)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img, nilearn.__version__, "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def make_example_dataset(out_dir: str | Path, force: bool = False) -> Path:
    """Write the example dataset into ``out_dir`` and return its path."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty (use --force to overwrite)")
    anat = out / "sub-01" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    img, nilearn_version, source = moved_template()
    nib.save(img, str(anat / "sub-01_T1w.nii.gz"))
    (anat / "sub-01_T1w.json").write_text(json.dumps({
        "Description": "MNI152 ICBM 2009a symmetric template (nilearn bundle), affine moved",
        "SkullStripped": True,
    }, indent=2) + "\n")
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": "brainage-bids example: MNI152 2009 template as one T1w scan",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "brainage-bids make_example_dataset.py",
                         "Description": "no download; template bundled with nilearn"}],
    }, indent=2) + "\n")
    (out / "participants.tsv").write_text(f"participant_id\tage\tsex\nsub-01\t{AGE:g}\tn/a\n")
    (out / "participants.json").write_text(json.dumps({
        "age": {"Description": "age at scan (illustrative: the template averages young adults)",
                "Units": "year"},
        "sex": {"Description": "n/a: a population average"},
    }, indent=2) + "\n")
    (out / "README").write_text(README.format(
        nilearn_version=nilearn_version, source=source, rotation=ROTATION_DEG, shift=SHIFT_MM,
        age=AGE))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder of the new BIDS dataset")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    opts = p.parse_args(argv)
    try:
        out = make_example_dataset(opts.out_dir, force=opts.force)
    except FileExistsError as exc:
        print(f"make_example_dataset: {exc}", file=sys.stderr)
        return 73
    print(f"wrote {out}; run: brainage-bids {out} OUTPUT_DIR participant --skull-strip none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
