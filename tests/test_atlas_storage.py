"""Atlas datasets on object storage: a local S3 server (moto) against the same files on disk.

The server listens on 127.0.0.1 at a free port; featuremaps reaches it as any S3 user
would, through the environment (``AWS_ENDPOINT_URL_S3`` and the ``AWS_*`` credentials).
"""

from __future__ import annotations

import json
import socket
import sys
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from featuremaps import FeatureMapsError, ImageError, LoadedModel
from featuremaps.atlas import SkippedImageWarning, build_atlas, dataset_paths
from featuremaps.atlas.data import read_image
from featuremaps.cli import main
from featuremaps.models import Preprocess

pytest.importorskip("s3fs", reason="needs the storage extra: pip install 'featuremaps[storage]'")
moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (test extra)")

BUCKET = "atlas-photos"
N_IMAGES = 22
LAYER = "features.3"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A moto S3 server on loopback; yields its endpoint, with the environment set."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(key, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        try:
            yield endpoint
        finally:
            _clear_fs_cache()
            server.stop()


def _clear_fs_cache() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dataset on disk: structured images in two folders and one broken file."""
    root = tmp_path_factory.mktemp("disk") / "photos"
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:40, 0:40]
    for i in range(N_IMAGES):
        arr = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        arr[..., i % 3] = ((xx * (i % 5 + 1) + yy * (i % 3)) * 7 % 256).astype(np.uint8)
        folder = root / ("sub" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / f"img{i:03d}.{'png' if i % 2 else 'jpg'}")
    (root / "broken.jpg").write_bytes(b"not a JPEG at all")
    (root / "readme.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def bucket(s3: str, disk: Path) -> str:
    """The same files in a bucket under ``photos/``; yields the prefix URL."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    for path in sorted(disk.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{BUCKET}/photos/{path.relative_to(disk).as_posix()}", path.read_bytes())
    fs.pipe_file(f"{BUCKET}/lists/some.txt", b"# two images\n../photos/img001.png\n\n")
    return f"s3://{BUCKET}/photos/"


@pytest.fixture(scope="module")
def tiny_model() -> LoadedModel:
    from conftest import ToyNet

    torch.manual_seed(0)
    return LoadedModel(ToyNet().eval(), Preprocess(resize=32, crop=32), "toy", "random")


def ship_by_value(model: LoadedModel) -> None:
    """Let Ray pickle the test's model class by value: workers cannot import ``conftest``."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[type(model.module).__module__])


def _build(model: LoadedModel, data: Any, out: Path, **kwargs: Any) -> Any:
    options: dict[str, Any] = {"top": 3, "batch_size": 4, "workers": 0}
    options.update(kwargs)
    with pytest.warns(SkippedImageWarning, match="broken.jpg"):
        return build_atlas(model, data, LAYER, out, **options)


@pytest.fixture(scope="module")
def on_disk(disk: Path, tiny_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("on-disk")
    _build(tiny_model, disk, out)
    return out


def _same_atlas(disk_out: Path, url_out: Path, disk: Path, url: str) -> None:
    """The two atlases are equal once each local path is written as its URL."""
    local = (disk_out / "atlas.json").read_text()
    remote = (url_out / "atlas.json").read_text()
    assert url in remote and str(disk) not in remote
    assert local.replace(json.dumps(str(disk) + "/")[1:-1], url) == remote
    with np.load(disk_out / "pca_basis.npz") as a, np.load(url_out / "pca_basis.npz") as b:
        assert a.files == b.files
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key
    for crop in sorted((disk_out / "crops").rglob("*.jpg")):
        twin = url_out / crop.relative_to(disk_out)
        assert crop.read_bytes() == twin.read_bytes(), twin


def test_prefix_glob_and_list_file_urls(bucket: str, disk: Path) -> None:
    listed = dataset_paths(bucket)
    want = sorted(
        f"{bucket}{p.relative_to(disk).as_posix()}"
        for p in disk.rglob("*")
        if p.suffix in (".png", ".jpg")
    )
    assert listed == want and len(listed) == N_IMAGES + 1
    assert dataset_paths(f"{bucket}sub/*.png") == [u for u in want if "/sub/" in u and "png" in u]
    assert dataset_paths(f"s3://{BUCKET}/lists/some.txt") == [
        f"s3://{BUCKET}/lists/../photos/img001.png"
    ]
    pixels = np.asarray(read_image(f"{bucket}img001.png"))
    assert np.array_equal(pixels, np.asarray(Image.open(disk / "img001.png").convert("RGB")))


def test_local_engine_over_s3_equals_the_files_on_disk(
    bucket: str, disk: Path, on_disk: Path, tiny_model: LoadedModel, tmp_path: Path
) -> None:
    result = _build(tiny_model, bucket, tmp_path, workers=2)
    assert result.images_used == N_IMAGES
    assert result.skipped[0][0] == f"{bucket}broken.jpg"
    _same_atlas(on_disk, tmp_path, disk, bucket)
    page = (tmp_path / f"{LAYER}.html").read_text()
    assert f"{bucket}img" in page


def test_a_local_list_of_urls(
    bucket: str, disk: Path, on_disk: Path, tiny_model: LoadedModel, tmp_path: Path
) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(dataset_paths(bucket)) + "\n")
    _build(tiny_model, listing, tmp_path / "out")
    _same_atlas(on_disk, tmp_path / "out", disk, bucket)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_engine_over_s3_equals_the_files_on_disk(
    bucket: str, disk: Path, on_disk: Path, tiny_model: LoadedModel, tmp_path: Path
) -> None:
    ray = pytest.importorskip("ray")
    ship_by_value(tiny_model)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error")  # inherits AWS_*
    try:
        result = _build(tiny_model, bucket, tmp_path, engine="ray", workers=2)
    finally:
        ray.shutdown()
    assert result.images_used == N_IMAGES
    _same_atlas(on_disk, tmp_path, disk, bucket)


def test_missing_objects_are_skipped_or_refused(
    bucket: str, tiny_model: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_text(f"{bucket}img001.png\n{bucket}gone.png\n")
    with pytest.warns(SkippedImageWarning, match=rf"skipped {bucket}gone.png: .*no such object"):
        result = build_atlas(tiny_model, listing, LAYER, tmp_path / "a", top=1, workers=0)
    assert result.images_used == 1
    with pytest.raises(ImageError, match="s3://no-such-bucket/x/: no such object"):
        dataset_paths("s3://no-such-bucket/x/")
    with pytest.raises(ImageError, match=f"{bucket}nothing/ holds no images"):
        dataset_paths(f"{bucket}nothing/")
    out = tmp_path / "c"
    code = _cli("atlas", "resnet18", f"{bucket}missing.jpg", "--weights", "none", "-o", str(out))
    err = capsys.readouterr().err
    assert code == 1 and f"{bucket}missing.jpg: no such object" in err


def _cli(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_bad_credentials_are_a_clear_error(
    bucket: str, s3: str, tiny_model: LoadedModel, tmp_path: Path
) -> None:
    def enforce(count: str) -> None:
        request = urllib.request.Request(
            f"{s3}/moto-api/reset-auth",
            count.encode(),
            headers={"Content-Type": "text/plain"},  # not form data: moto reads the body
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10):
            pass
        _clear_fs_cache()

    enforce("0")  # from now on moto checks keys: "testing" is no known key
    try:
        with pytest.raises(ImageError, match=rf"{bucket}: access denied .*AWS_ACCESS_KEY_ID"):
            build_atlas(tiny_model, bucket, LAYER, tmp_path / "out", workers=0)
        with pytest.raises(ImageError, match="access denied"):
            read_image(f"{bucket}img001.png")
    finally:
        enforce("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(f"{bucket}img001.png").size == (40, 40)


def test_a_url_without_its_filesystem_says_what_to_install() -> None:
    with pytest.raises(FeatureMapsError, match="no-such-proto://x/"):
        dataset_paths("no-such-proto://x/")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_two_node_ray_cluster_over_s3_equals_the_local_engine(
    bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``featuremaps atlas resnet18 s3://... --engine ray --ray-address ADDR`` on two nodes."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    common = ["resnet18", bucket, "--weights", "none", "--layers", "stages", "--top", "3"]
    common += ["--batch-size", "6", "--workers", "2"]
    assert _cli("atlas", *common, "--out", str(tmp_path / "local")) == 0
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1)  # a second raylet: the two actors land on two nodes
        cluster.wait_for_nodes()
        ray_args = ["--engine", "ray", "--ray-address", cluster.address]
        code = _cli("atlas", *common, *ray_args, "--out", str(tmp_path / "ray"))
    finally:
        cluster.shutdown()
    said = capsys.readouterr()
    assert code == 0, said.err
    assert f"{N_IMAGES} of {N_IMAGES + 1} images used" in said.out
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    assert (local / "atlas.json").read_bytes() == (ray_out / "atlas.json").read_bytes()
    with np.load(local / "pca_basis.npz") as a, np.load(ray_out / "pca_basis.npz") as b:
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key
