"""Secure aggregation's maths (models/_secagg.py) and node authentication's pure parts: masks
cancel exactly, the aggregate is the weighted mean within the quantisation step, one masked
update tells nothing, a dropout is recovered exactly, the payload and property rules."""

from __future__ import annotations

import numpy as np
import pytest

from models import (
    FederationAuthError,
    FederationPayloadError,
    SecAggParams,
    SiteAllowList,
    check_payload,
    check_properties,
    dequantise,
    keygen,
    load_site_key,
    mask_key_pair,
    mask_update,
    pair_seed,
    quantise,
    read_site_keys,
    sign_challenge,
    site_auth_message,
    unmask_sum,
    verify_site,
)

SHAPES = [(3, 4), (5,), (2, 2, 2)]
PARAMS = SecAggParams()
IDS = ["0a" * 16, "5c" * 16, "f3" * 16]  # Flower's connection ids: 32 hex digits


def _sites(round_: int = 1) -> tuple[list[np.ndarray], dict[str, dict[str, bytes]]]:
    """Each site's pairwise seeds with every other site, derived from its own key only."""
    keys = {cid: mask_key_pair() for cid in IDS}
    seeds = {cid: {peer: pair_seed(keys[cid][0], keys[peer][1], round_, cid, peer) for peer in IDS if peer != cid}
             for cid in IDS}
    return [], seeds


def _updates(rng: np.random.Generator) -> tuple[list[list[np.ndarray]], list[int]]:
    deltas = [[rng.normal(0, 0.05, s) for s in SHAPES] for _ in IDS]
    return deltas, [40, 7, 113]


def test_pairwise_seeds_agree_and_are_bound_to_round_and_ids():
    (a, a_pub), (b, b_pub) = mask_key_pair(), mask_key_pair()
    seed = pair_seed(a, b_pub, 3, IDS[0], IDS[1])
    assert seed == pair_seed(b, a_pub, 3, IDS[1], IDS[0]) and len(seed) == 32
    assert seed != pair_seed(a, b_pub, 4, IDS[0], IDS[1])
    assert seed != pair_seed(a, b_pub, 3, IDS[0], IDS[2])


def test_masks_cancel_exactly_and_the_aggregate_is_the_weighted_mean():
    rng = np.random.default_rng(0)
    deltas, counts = _updates(rng)
    _, seeds = _sites()
    quantised = [quantise(d, n, PARAMS)[0] for d, n in zip(deltas, counts, strict=True)]
    masked = [mask_update(q, cid, seeds[cid]) for q, cid in zip(quantised, IDS, strict=True)]
    total = unmask_sum(masked, [], SHAPES)
    plain = unmask_sum(quantised, [], SHAPES)
    assert all(np.array_equal(t, p) for t, p in zip(total, plain, strict=True))  # bit for bit
    mean = dequantise(total, sum(counts), PARAMS)
    step = len(IDS) * 0.5 / 2**PARAMS.scale_bits / sum(counts)  # rounding, at most half a step a site
    for k, shape in enumerate(SHAPES):
        expected = sum(n * d[k] for d, n in zip(deltas, counts, strict=True)) / sum(counts)
        assert mean[k].shape == shape
        assert np.max(np.abs(mean[k] - expected)) <= step * 1.01


def test_one_masked_update_is_statistically_unrelated_to_the_plain_one():
    rng = np.random.default_rng(1)
    shapes = [(200, 100)]
    delta = [rng.normal(0, 0.05, shapes[0])]
    _, seeds = _sites()
    quantised, _ = quantise(delta, 50, PARAMS)
    masked = mask_update(quantised, IDS[1], seeds[IDS[1]])[0]
    # The top byte of a masked value is uniform (chi-square, 255 degrees of freedom: 99.9% < 330)...
    counts = np.bincount((masked >> np.uint64(56)).astype(np.int64).ravel(), minlength=256)
    expected = masked.size / 256
    assert float(np.sum((counts - expected) ** 2 / expected)) < 330
    # ...and uncorrelated with the plain update (|r| < 4 / sqrt(n) for n = 20000).
    r = np.corrcoef((masked >> np.uint64(11)).astype(np.float64).ravel(), delta[0].ravel())[0, 1]
    assert abs(r) < 4 / np.sqrt(masked.size)
    # The same update masked in another round (fresh keys) shares nothing with this one.
    _, other = _sites(round_=2)
    again = mask_update(quantised, IDS[1], other[IDS[1]])[0]
    assert np.count_nonzero(again == masked) < 5


def test_a_dropout_after_the_key_exchange_is_recovered_exactly():
    rng = np.random.default_rng(2)
    deltas, counts = _updates(rng)
    _, seeds = _sites()
    quantised = [quantise(d, n, PARAMS)[0] for d, n in zip(deltas, counts, strict=True)]
    masked = [mask_update(q, cid, seeds[cid]) for q, cid in zip(quantised, IDS, strict=True)]
    dropped = IDS[1]  # its masked update never arrives; the other two reveal their seeds with it
    survivors = [0, 2]
    revealed = [(IDS[i], dropped, seeds[IDS[i]][dropped]) for i in survivors]
    total = unmask_sum([masked[i] for i in survivors], revealed, SHAPES)
    plain = unmask_sum([quantised[i] for i in survivors], [], SHAPES)
    assert all(np.array_equal(t, p) for t, p in zip(total, plain, strict=True))
    # Without the reveal the sum is still masked.
    assert not np.array_equal(unmask_sum([masked[i] for i in survivors], [], SHAPES)[0], plain[0])


def test_fixed_point_cannot_overflow_and_out_of_range_elements_are_clipped():
    p = SecAggParams()
    assert p.max_sites * p.max_examples * p.element_range * 2**p.scale_bits <= 2**62
    worst = [np.full((4,), p.element_range * 10)]
    quantised, clipped = quantise(worst, p.max_examples, p)
    assert clipped == 4
    total = unmask_sum([quantised] * p.max_sites, [], [(4,)])
    assert np.allclose(dequantise(total, p.max_sites * p.max_examples, p)[0], p.element_range)
    negative = unmask_sum([quantise([-w for w in worst], p.max_examples, p)[0]] * p.max_sites, [], [(4,)])
    assert np.allclose(dequantise(negative, p.max_sites * p.max_examples, p)[0], -p.element_range)
    with pytest.raises(Exception, match="training examples"):
        quantise(worst, p.max_examples + 1, p)


def test_payload_rule_accepts_masked_uint64_only_with_secure_aggregation():
    shapes = [(2, 3), (4,)]
    masked = [np.zeros(s, np.uint64) for s in shapes]
    check_payload(masked, {"loss": 0.1}, shapes, masked=True)
    with pytest.raises(FederationPayloadError):
        check_payload(masked, {}, shapes)  # plain federation: float32 only
    with pytest.raises(FederationPayloadError):
        check_payload([np.zeros(s, np.float32) for s in shapes], {}, shapes, masked=True)
    with pytest.raises(FederationPayloadError):
        check_payload([masked[0], np.zeros((5,), np.uint64)], {}, shapes, masked=True)
    with pytest.raises(FederationPayloadError):
        check_payload([masked[0].astype(np.int64), masked[1]], {}, shapes, masked=True)


def test_property_rule():
    check_properties({"site_key": bytes(32), "signature": bytes(64), "mask_key": bytes(32)})
    check_properties({f"seed:{IDS[0]}": bytes(32)})
    check_properties({})
    for bad in ({"site_name": b"x"}, {"site_key": bytes(31)}, {"mask_key": "text"}, {"seed:../x": bytes(32)},
                {"signature": 1.0}):
        with pytest.raises(FederationPayloadError):
            check_properties(bad)


def test_site_signatures_and_the_allow_list(tmp_path):
    public_path, print_a = keygen(tmp_path / "a.pem")
    _, print_b = keygen(tmp_path / "b.pem")
    key = load_site_key(tmp_path / "a.pem")
    message = site_auth_message(2, IDS[0], b"c" * 32, b"k" * 32)
    public, signature = sign_challenge(key, message)
    listed = tmp_path / "sites.txt"
    listed.write_text(f"# hospital A's key, as a PEM block\n{public_path.read_text()}\n{print_b}  # B\n")
    allowed = read_site_keys(listed)
    assert allowed.fingerprints == {print_a, print_b}
    assert verify_site(allowed, public, signature, message) == print_a
    assert verify_site(None, public, signature, message) == print_a
    with pytest.raises(FederationAuthError, match="does not verify"):
        verify_site(allowed, public, signature, site_auth_message(3, IDS[0], b"c" * 32, b"k" * 32))
    with pytest.raises(FederationAuthError, match="allow-list"):
        verify_site(SiteAllowList(frozenset({print_b})), public, signature, message)
    for text in ("not a key\n", "", "-----BEGIN PUBLIC KEY-----\nAAAA\n"):
        with pytest.raises(FederationAuthError):
            SiteAllowList.parse(text)
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    (tmp_path / "ec.pem").write_bytes(other)
    with pytest.raises(FederationAuthError, match="not an Ed25519"):
        load_site_key(tmp_path / "ec.pem")
    (tmp_path / "x.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(FederationAuthError, match="not a PEM private key"):
        load_site_key(tmp_path / "x.pem")
