"""Compare susceptibility maps written by two runs (host and container): same grid, same values.

Usage: python compare_chi.py REFERENCE.nii.gz OTHER.nii.gz [OTHER ...]
Exit 0 when every OTHER has REFERENCE's shape and affine and differs from it by at most 1e-4 of
REFERENCE's largest absolute value (float32 rounding and thread-order summation, not method
changes); otherwise print the file and the difference and exit 1.
"""

import sys

import nibabel as nib
import numpy as np


def main(argv):
    ref_img = nib.load(argv[0])
    ref = np.asarray(ref_img.dataobj, dtype=np.float64)
    scale = float(np.abs(ref).max())
    if scale == 0:
        print(f"{argv[0]}: the reference chi map is all zeros")
        return 1
    status = 0
    for path in argv[1:]:
        img = nib.load(path)
        if img.shape != ref_img.shape or not np.allclose(img.affine, ref_img.affine, atol=1e-5):
            print(f"{path}: grid differs from {argv[0]} ({img.shape} vs {ref_img.shape})")
            status = 1
            continue
        diff = float(np.abs(np.asarray(img.dataobj, dtype=np.float64) - ref).max())
        ok = diff <= 1e-4 * scale
        print(
            f"{path}: max |difference| {diff:.3g} ppm (max |chi| {scale:.3g} ppm) "
            f"{'OK' if ok else 'TOO LARGE'}"
        )
        status |= not ok
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
