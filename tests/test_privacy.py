import shutil
import stat

from pipeline import content_digest, site_secret, slide_id


def test_site_secret_is_created_once_with_owner_only_permissions(tmp_path):
    secret = site_secret(tmp_path)
    assert len(secret) == 32
    mode = stat.S_IMODE((tmp_path / "site.key").stat().st_mode)
    assert mode == 0o600
    assert site_secret(tmp_path) == secret


def test_slide_id_follows_content_not_name(tmp_path, cmu_svs):
    secret = site_secret(tmp_path / "site")
    copy = tmp_path / "renamed-copy.svs"
    shutil.copy(cmu_svs, copy)
    a = slide_id(content_digest(cmu_svs), secret)
    assert a == slide_id(content_digest(copy), secret)
    assert a.startswith("s-") and len(a) == 22
    assert "CMU" not in a
    other_site = slide_id(content_digest(cmu_svs), site_secret(tmp_path / "other-site"))
    assert other_site != a


def test_dicom_folder_digest_ignores_file_names(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "1.dcm").write_bytes(b"one")
    (folder / "2.dcm").write_bytes(b"two")
    renamed = tmp_path / "b"
    renamed.mkdir()
    (renamed / "x.dcm").write_bytes(b"two")
    (renamed / "y.dcm").write_bytes(b"one")
    assert content_digest(folder) == content_digest(renamed)
