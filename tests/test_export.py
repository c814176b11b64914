"""Mesh export on analytic density fields: geometry, threshold rule, cleanup, colours, texture, files, errors."""

import json
import math
import struct

import numpy as np
import pygltflib
import pytest
import torch
import trimesh

import dd3d.export as export
from dd3d.cli import UserError
from dd3d.export import ZUP_TO_YUP, default_threshold, extract_mesh, write_mesh


def ball(radius=0.5, centre=(0.0, 0.0, 0.0), sigma=200.0):
    centre = torch.tensor(centre)
    return lambda p: ((p - centre).norm(dim=-1) < radius).float() * sigma


def box(half=(0.6, 0.4, 0.3), centre=(0.1, -0.1, 0.05), sigma=200.0):
    half, centre = torch.tensor(half), torch.tensor(centre)
    return lambda p: ((p - centre).abs() < half).all(-1).float() * sigma


def union(*fields):
    return lambda p: torch.stack([f(p) for f in fields]).amax(0)


def albedo(p):
    """A smooth colour field with values in [0.1, 0.9]."""
    return 0.5 + 0.4 * torch.sin(2.0 * p + torch.tensor([0.0, 1.0, 2.0]))


def extract(density, resolution=64, **kwargs):
    return extract_mesh(density, albedo, 1.0, resolution=resolution, progress=False, **kwargs)


def outward_fraction(mesh, centre=(0.0, 0.0, 0.0)):
    return float(((mesh.vertex_normals * (mesh.vertices - np.array(centre))).sum(1) > 0).mean())


def ray_opacity_depth(density_1d, start=-1.0, stop=0.0, n=200001):
    """How far from the centre a ray entering at `start` reaches opacity 0.5 (fine 1D trapezoid integration)."""
    x = np.linspace(start, stop, n)
    sigma = density_1d(x)
    depth = np.concatenate([[0.0], np.cumsum((sigma[1:] + sigma[:-1]) / 2 * np.diff(x))])
    return -x[np.searchsorted(depth, math.log(2.0))]


def test_hard_ball_radius_volume_and_outward_normals():
    mesh = extract(ball())
    voxel = 2 / 63
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert abs(radii.mean() - 0.5) < voxel / 2 and np.abs(radii - 0.5).max() < voxel
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.5**3, rel=0.06)
    assert outward_fraction(mesh) == 1.0
    assert mesh.visual.kind == "vertex" and len(mesh.visual.vertex_colors) == len(mesh.vertices)


def test_box_volume_with_a_tensor_scene_box():
    aabb = torch.tensor([[-0.8, -1.0, -0.9], [1.0, 0.9, 1.0]])
    mesh = extract_mesh(box(), albedo, aabb, resolution=64, progress=False)
    assert mesh.is_watertight and mesh.volume == pytest.approx(1.2 * 0.8 * 0.6, rel=0.05)
    expected = np.array([[-0.5, -0.5, -0.25], [0.7, 0.3, 0.35]])
    assert np.abs(mesh.bounds - expected).max() < 0.03
    assert outward_fraction(mesh, (0.1, -0.1, 0.05)) > 0.99


def test_object_cut_by_the_scene_box_is_closed():
    mesh = extract(ball(radius=0.6, centre=(0.8, 0.0, 0.0)), resolution=48)
    assert mesh.is_watertight and mesh.volume > 0
    assert mesh.bounds[1, 0] == pytest.approx(1.0, abs=2 / 47)


def test_a_hollow_ball_has_its_cavity_facing_inward():
    field = lambda p: ((p.norm(dim=-1) > 0.3) & (p.norm(dim=-1) < 0.6)).float() * 200.0  # noqa: E731
    mesh = extract(field, resolution=48, surface="density")
    inner = np.linalg.norm(mesh.vertices, axis=1) < 0.45
    radial = (mesh.vertex_normals * mesh.vertices).sum(1)
    assert mesh.is_watertight and (radial[inner] < 0).all() and (radial[~inner] > 0).all()
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * (0.6**3 - 0.3**3), rel=0.08)


def test_small_floaters_are_dropped():
    field = union(ball(0.45, (-0.3, 0.0, 0.0)), ball(0.08, (0.65, 0.65, 0.65)))
    assert len(extract(field).split(only_watertight=False)) == 1
    assert len(extract(field, min_component_fraction=0.0).split(only_watertight=False)) == 2


@pytest.mark.parametrize("amplitude,width", [(1000.0, 0.15), (100.0, 0.25)])
def test_default_threshold_puts_a_soft_blob_where_rays_turn_opaque(amplitude, width):
    field = lambda p: amplitude * torch.exp(-(p**2).sum(-1) / (2 * width**2))  # noqa: E731
    expected = ray_opacity_depth(lambda x: amplitude * np.exp(-(x**2) / (2 * width**2)))
    mesh = extract(field, surface="density")
    assert np.linalg.norm(mesh.vertices, axis=1).mean() == pytest.approx(expected, abs=0.01)  # a third of a voxel


def test_default_threshold_on_a_soft_shell_and_a_hard_step():
    field = lambda p: 100.0 * torch.sigmoid((0.5 - p.norm(dim=-1)) / 0.05)  # noqa: E731
    expected = ray_opacity_depth(lambda x: 100.0 / (1 + np.exp(-(0.5 - np.abs(x)) / 0.05)))
    radii = np.linalg.norm(extract(field, surface="density").vertices, axis=1)
    assert radii.mean() == pytest.approx(expected, abs=0.01)
    step = torch.zeros(12, 12, 12)
    step[6:] = 40.0  # rays along x enter the slab at index 6 (from 5) and leave at the far end
    threshold = default_threshold(step, torch.full((3,), 0.1))
    # crossing in [5, 6]: 0.1 * 40 u^2 / 2 = ln 2 -> u = sqrt(ln 2 / 2), density 40 u
    assert threshold == pytest.approx(40 * math.sqrt(math.log(2) / 2), rel=1e-5)
    assert default_threshold(torch.zeros(8, 8, 8), torch.full((3,), 0.1)) is None


def test_the_opacity_surface_is_one_closed_piece_where_a_density_surface_is_hollow():
    """A NeRF's density often peaks at its surface: here a thin dense shell at r = 0.5 around a faint but opaque
    inside (optical depth 5 across). The default surface encloses it all, at the depth where rays turn half opaque;
    a density iso-surface at the level where they do is two shells."""
    profile = lambda r: 400.0 * np.exp(-(((r - 0.5) / 0.04) ** 2)) + 5.0 * (r < 0.5)  # noqa: E731
    field = lambda p: torch.as_tensor(profile(p.norm(dim=-1).numpy()), dtype=torch.float32)  # noqa: E731
    surface = extract(field)
    assert len(surface.split(only_watertight=False)) == 1 and surface.is_watertight
    on_axes = surface.vertices[np.abs(surface.vertices).max(1) > 0.98 * np.linalg.norm(surface.vertices, axis=1)]
    assert np.linalg.norm(on_axes, axis=1).mean() == pytest.approx(ray_opacity_depth(lambda x: profile(np.abs(x))),
                                                                     abs=0.01)
    assert outward_fraction(surface) == 1.0
    assert len(extract(field, surface="density").split(only_watertight=False)) == 2


def test_a_cup_open_along_an_axis_stays_open():
    cup = lambda p: ((p[:, :2].norm(dim=-1) < 0.5) & (p[:, 2].abs() < 0.5)  # noqa: E731
                     & ~((p[:, :2].norm(dim=-1) < 0.35) & (p[:, 2] > -0.3))).float() * 200.0
    mesh = extract(cup)
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(math.pi * (0.5**2 - 0.35**2 * 0.8), rel=0.08)  # the inside is not filled


def test_decimation_to_a_face_budget_keeps_a_closed_outward_mesh():
    mesh = extract(ball(), face_budget=1000)
    assert len(mesh.faces) <= 1000 and mesh.is_watertight
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.5**3, rel=0.1)
    assert outward_fraction(mesh) > 0.99


def read_glb(path):
    """(json tree, binary chunk) of a GLB file, checking the container layout of the glTF 2.0 spec."""
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    assert (magic, version, length) == (b"glTF", 2, len(data))
    json_length, json_type = struct.unpack_from("<II", data, 12)
    assert json_type == 0x4E4F534A and json_length % 4 == 0
    tree = json.loads(data[20 : 20 + json_length])
    bin_length, bin_type = struct.unpack_from("<II", data, 20 + json_length)
    assert bin_type == 0x004E4942 and bin_length % 4 == 0 and 28 + json_length + bin_length == len(data)
    return tree, data[28 + json_length :]


COMPONENTS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}
DTYPES = {5121: np.uint8, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}


def accessor(tree, binary, index):
    """An accessor's data as an array, after checking that it fits inside its buffer view and the buffer."""
    acc = tree["accessors"][index]
    view = tree["bufferViews"][acc["bufferView"]]
    dtype = np.dtype(DTYPES[acc["componentType"]])
    width = COMPONENTS[acc["type"]]
    offset = acc.get("byteOffset", 0)
    assert offset % dtype.itemsize == 0 and view.get("byteOffset", 0) % dtype.itemsize == 0
    assert offset + acc["count"] * width * dtype.itemsize <= view["byteLength"]
    assert view.get("byteOffset", 0) + view["byteLength"] <= tree["buffers"][view["buffer"]]["byteLength"]
    start = view.get("byteOffset", 0) + offset
    array = np.frombuffer(binary, dtype, acc["count"] * width, start).reshape(acc["count"], width)
    if "min" in acc:
        assert np.allclose(array.min(0), acc["min"], atol=1e-5) and np.allclose(array.max(0), acc["max"], atol=1e-5)
    return array


def glb_primitive(tree, binary):
    """The single primitive's attribute arrays and triangle indices, with glTF's structural rules checked."""
    assert tree["asset"]["version"] == "2.0" and len(tree["buffers"]) == 1 and "uri" not in tree["buffers"][0]
    assert tree["buffers"][0]["byteLength"] <= len(binary)
    (gltf_mesh,) = tree["meshes"]
    (primitive,) = gltf_mesh["primitives"]
    assert primitive.get("mode", 4) == 4
    arrays = {name: accessor(tree, binary, index) for name, index in primitive["attributes"].items()}
    counts = {len(array) for array in arrays.values()}
    assert len(counts) == 1, f"attribute counts differ: {counts}"
    assert "min" in tree["accessors"][primitive["attributes"]["POSITION"]]  # required for POSITION
    indices = accessor(tree, binary, primitive["indices"]).reshape(-1, 3)
    assert indices.max() < counts.pop()
    pbr = tree["materials"][primitive["material"]]["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0 and pbr["roughnessFactor"] == 1
    return arrays, indices, pbr


def expected_output_vertices(mesh, size=1.0):
    centred = mesh.vertices - mesh.bounds.mean(0)
    return centred @ ZUP_TO_YUP.T * (size / mesh.extents.max())


def load_single(path):
    loaded = trimesh.load(path, process=False)
    if isinstance(loaded, trimesh.Scene):
        (loaded,) = loaded.geometry.values()
    return loaded


def test_vertex_coloured_obj_and_glb_round_trip(tmp_path):
    mesh = extract(ball(), resolution=40)
    written = write_mesh(mesh, tmp_path / "ball")
    assert [p.name for p in written] == ["ball.obj", "ball.glb"]
    srgb = mesh.visual.vertex_colors[:, :3].astype(int)

    obj = load_single(tmp_path / "ball.obj")
    assert obj.vertices.shape == mesh.vertices.shape and np.array_equal(obj.faces, mesh.faces)
    assert np.abs(obj.visual.vertex_colors[:, :3].astype(int) - srgb).max() <= 1

    glb = load_single(tmp_path / "ball.glb")
    assert glb.vertices.shape == mesh.vertices.shape and np.array_equal(glb.faces, mesh.faces)
    tree, binary = read_glb(tmp_path / "ball.glb")
    arrays, indices, _ = glb_primitive(tree, binary)
    assert set(arrays) == {"POSITION", "NORMAL", "COLOR_0"} and np.array_equal(indices, mesh.faces)
    linear = np.round(export._srgb_to_linear(srgb / 255) * 255)
    assert np.abs(arrays["COLOR_0"][:, :3].astype(int) - linear).max() <= 1  # glTF vertex colours are linear
    assert tree["accessors"][tree["meshes"][0]["primitives"][0]["attributes"]["COLOR_0"]]["normalized"] is True

    gltf = pygltflib.GLTF2().load(str(tmp_path / "ball.glb"))  # an independent reader agrees
    primitive = gltf.meshes[0].primitives[0]
    assert gltf.accessors[primitive.attributes.POSITION].count == len(mesh.vertices)
    assert gltf.accessors[primitive.indices].count == 3 * len(mesh.faces)
    material = gltf.materials[primitive.material].pbrMetallicRoughness
    assert (material.metallicFactor, material.roughnessFactor) == (0, 1)


def test_files_are_y_up_front_z_centred_and_one_metre():
    """A body with a nose at +X (front) and a hat at +Z (up): in the files the nose is at +Z and the hat at +Y."""
    field = union(box((0.3, 0.25, 0.3)), ball(0.15, (0.45, -0.1, 0.05)), box((0.1, 0.1, 0.2), (0.1, -0.1, 0.45)))
    mesh = extract(field, resolution=48)
    out = export.to_output_frame(mesh)
    assert np.allclose(out.vertices, expected_output_vertices(mesh))
    assert np.allclose(out.bounds.mean(0), 0) and out.extents.max() == pytest.approx(1.0)
    nose, hat = np.argmax(mesh.vertices[:, 0]), np.argmax(mesh.vertices[:, 2])
    assert np.argmax(out.vertices[:, 2]) == nose and np.argmax(out.vertices[:, 1]) == hat
    assert np.allclose(out.vertex_normals, mesh.vertex_normals @ ZUP_TO_YUP.T, atol=1e-6)
    assert np.linalg.det(ZUP_TO_YUP) == pytest.approx(1.0) and out.volume > 0


def test_written_glb_positions_and_normals_are_in_the_output_frame(tmp_path):
    mesh = extract(box(), resolution=40)
    (path,) = write_mesh(mesh, tmp_path / "box.glb", size=2.0)
    arrays, _, _ = glb_primitive(*read_glb(path))
    assert np.allclose(arrays["POSITION"], expected_output_vertices(mesh, 2.0), atol=1e-5)
    normals = mesh.vertex_normals @ ZUP_TO_YUP.T
    assert np.allclose(arrays["NORMAL"], normals / np.linalg.norm(normals, axis=1, keepdims=True), atol=1e-5)


def test_textured_export_bakes_the_albedo(tmp_path):
    mesh = extract(ball(), resolution=40, texture_size=256)
    uv = mesh.visual.uv
    assert uv.min() >= 0 and uv.max() <= 1
    written = write_mesh(mesh, tmp_path)
    assert sorted(p.name for p in written) == ["mesh.glb", "mesh.mtl", "mesh.obj", "mesh.png"]
    assert "map_Kd mesh.png" in (tmp_path / "mesh.mtl").read_text()

    tree, binary = read_glb(tmp_path / "mesh.glb")
    arrays, indices, pbr = glb_primitive(tree, binary)
    assert set(arrays) == {"POSITION", "NORMAL", "TEXCOORD_0"} and len(arrays["POSITION"]) == len(mesh.vertices)
    image = tree["images"][tree["textures"][pbr["baseColorTexture"]["index"]]["source"]]
    assert image["mimeType"] == "image/png" and "bufferView" in image and "uri" not in image
    view = tree["bufferViews"][image["bufferView"]]
    png = binary[view.get("byteOffset", 0) : view.get("byteOffset", 0) + view["byteLength"]]
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    # look the texture up (glTF convention: UV (0, 0) is the image's top-left corner) at random surface points
    texture = np.asarray(load_single(tmp_path / "mesh.glb").visual.material.baseColorTexture.convert("RGB")) / 255
    assert texture.min() > 0.09 and texture.max() < 0.91  # no black between charts: padded, then the mean colour
    rng = np.random.default_rng(0)
    faces = rng.integers(0, len(mesh.faces), 2000)
    weights = rng.dirichlet(np.ones(3), len(faces))[:, :, None]
    points = (mesh.vertices[mesh.faces[faces]] * weights).sum(1)
    st = (arrays["TEXCOORD_0"][indices[faces]] * weights).sum(1)
    texel = np.clip((st * 256).astype(int), 0, 255)
    baked = texture[texel[:, 1], texel[:, 0]]
    truth = albedo(torch.as_tensor(points, dtype=torch.float32)).numpy()
    error = np.abs(baked - truth)
    assert error.mean() < 0.02 and error.max() < 0.1

    obj = load_single(tmp_path / "mesh.obj")
    assert len(obj.faces) == len(mesh.faces) and obj.visual.uv.shape == (len(obj.vertices), 2)
    assert np.array_equal(np.asarray(obj.visual.material.image.convert("RGB")), np.round(texture * 255))


def test_padding_fills_texels_around_charts():
    colours = np.zeros((6, 6, 3))
    filled = np.zeros((6, 6), dtype=bool)
    colours[2, 2], filled[2, 2] = (1.0, 0.5, 0.0), True
    grown, grown_filled = export._dilate(colours, filled, 2)
    assert grown_filled.sum() == 25 and np.allclose(grown[grown_filled], (1.0, 0.5, 0.0))


def test_empty_fields_are_refused_with_a_suggested_threshold_and_write_nothing(tmp_path):
    def export_to(field, **kwargs):
        write_mesh(extract(field, resolution=24, **kwargs), tmp_path / "mesh")

    with pytest.raises(UserError, match="zero everywhere"):
        export_to(lambda p: torch.zeros(len(p)))
    with pytest.raises(UserError, match=r"opacity 0.5.*threshold=0.025"):
        export_to(ball(sigma=0.05))  # a faint haze: 5% opacity through the middle
    with pytest.raises(UserError, match=r"exceeds the threshold 500.*threshold=100"):
        export_to(ball(sigma=200.0), threshold=500.0)
    assert not any(tmp_path.iterdir())


def test_too_large_a_resolution_is_refused_before_any_work():
    def untouchable(points):
        raise AssertionError("the field must not be evaluated")

    with pytest.raises(UserError, match=r"resolution 100000 needs about \d+.* GiB"):
        extract_mesh(untouchable, untouchable, 1.0, resolution=100_000)


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="positive number"):
        extract(ball(), resolution=16, threshold=-1.0)
    with pytest.raises(UserError, match="too small"):
        extract(ball(), resolution=4)
    with pytest.raises(UserError, match="scene box"):
        extract_mesh(ball(), albedo, torch.zeros(2, 3))
    for options, message in [
        ({"min_component_fraction": 2.0}, "between 0 and 1"),
        ({"face_budget": 0}, "face budget"),
        ({"texture_size": 4}, "texture size 4 is too small"),
    ]:
        with pytest.raises(UserError, match=message):
            extract(ball(), resolution=16, **options)
    with pytest.raises(UserError, match="unknown mesh format 'ply'"):
        write_mesh(extract(ball(), resolution=16), tmp_path / "mesh", formats=("ply",))


def test_a_failed_write_leaves_the_old_files_alone(tmp_path, monkeypatch):
    mesh = extract(ball(), resolution=16)
    (tmp_path / "mesh.glb").write_bytes(b"old")

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(trimesh.exchange.gltf, "export_glb", broken)
    with pytest.raises(RuntimeError):
        write_mesh(mesh, tmp_path / "mesh")  # the obj is encoded first, but nothing is written before all are
    assert [p.name for p in tmp_path.iterdir()] == ["mesh.glb"] and (tmp_path / "mesh.glb").read_bytes() == b"old"
