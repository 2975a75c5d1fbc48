"""The held-out synthetic benchmark scores a model only on pairs whose slices its card did not train on."""

from benchmarks.evaluate_synthetic import slices_of, trained_on


def card(*images: str) -> dict:
    return {"training": {"images": list(images)}}


def test_slices_of_reads_whole_scans_and_nested_crops():
    assert slices_of("lidc_0001_chest_ct.nii.gz") == ("lidc_0001_chest_ct.nii.gz", 0, float("inf"))
    assert slices_of("chest_ct_1.5mm.nii.gz[z62:246]") == ("chest_ct_1.5mm.nii.gz", 62, 246)
    assert slices_of("chest_ct_1.5mm.nii.gz[z10:90][z5:20]") == ("chest_ct_1.5mm.nii.gz", 15, 30)


def test_a_whole_training_scan_covers_its_slab_and_a_disjoint_slab_does_not():
    slab = "chest_ct_1.5mm.nii.gz[z0:62]"
    assert trained_on(card("abdomen_ct_3mm.nii.gz", "chest_ct_1.5mm.nii.gz"), slab)       # the canonical run
    assert not trained_on(card("chest_ct_1.5mm.nii.gz[z62:246]", "phantom0"), slab)       # split by slices
    assert trained_on(card("chest_ct_1.5mm.nii.gz[z60:246]"), slab)                       # two slices overlap
    assert not trained_on(card("chest_ct_1.5mm.nii.gz.bak", "phantom7"), slab)            # other scans
    assert not trained_on(card("phantom2026"), "phantom7000000")
    assert not trained_on({}, slab)                                                       # a card without a list
