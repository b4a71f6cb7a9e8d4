"""``fmjax.aot.table``: the scaling table's mesh choice, search order and markdown (no compile)."""
from fmjax.aot import table


def test_mesh_shards_params_evenly():
    assert table.mesh_for(1408, 256) == dict(data=2, fsdp=128, tensor=1)   # ViT-g/14's width
    assert table.mesh_for(256, 16) == dict(data=1, fsdp=16, tensor=1)
    assert table.mesh_for(128, 512) == dict(data=4, fsdp=128, tensor=1)
    for row in table.ROWS:
        for topology in table.TOPOLOGIES:
            mesh, _ = table.candidates(row, topology)
            assert mesh["data"] * mesh["fsdp"] == table.chips_of(topology)


def test_candidates_fastest_first():
    _, attempts = table.candidates("clip_g14", "v5e-256")
    names = [n for n, _ in attempts]
    assert names[:4] == ["remat none", "remat dots_saveable", "remat full", "remat full, 2 micro-batches"]
    assert all("--config.model.scan_layers=True" in o for _, o in attempts)
    _, unet = table.candidates("ddpm_cifar", "v5e-16")
    assert all("--config.model.scan_layers=True" not in o for _, o in unet)  # the U-Net has no scan


def test_render_marks_missing_and_failed_cells():
    report = dict(mesh=dict(data=2, fsdp=128, tensor=1), compiler=dict(total=10 * 2 ** 30),
                  roofline_s=3.8, mfu_at_roofline=0.6)
    results = {
        "clip_g14@v5e-256": dict(fits=True, attempts=[dict(name="remat full", exit=1, message="x"),
                                                      dict(name="remat full, 2 micro-batches", exit=0,
                                                           message="", report=report)]),
        "clip_g14@v5e-16": dict(fits=False, attempts=[dict(name="remat full, 32 micro-batches",
                                                          exit=1, message="does not fit")]),
    }
    md = table.render(results)
    g14 = next(line for line in md.splitlines() if "ViT-g/14" in line)
    assert "data 2 x fsdp 128, remat full, 2 micro-batches: 10.0 GiB; 3.80 s/step, MFU &le; 60%" in g14
    assert "does not fit" in g14
    assert md.count("not compiled yet") == len(table.ROWS) * len(table.TOPOLOGIES) - 2
    assert f"2 of {len(table.ROWS) * len(table.TOPOLOGIES)} cells compiled" in md
