import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.grams import GramError, low_rank_factor, shrink
from common.identity import Partition
from common.lorm_manifest_pb2 import CHECK_ORDER, GRAMS_ORDER, ROUND_ORDER, ROUND_REPLY, Manifest
from common.protocol import (
    MANIFEST_KEY, PACKED_KEY, SCHEMA_VERSION, ClientReply, NodeCheck, ProtocolError, RoundOrder, check_order,
    read_manifest, read_message,
)
from common.validation import check_gram
from common.wire import flatten, pack_symmetric, unflatten, unpack_symmetric

ROOT = Path(__file__).resolve().parents[1]

PART = Partition(1, 3, bytes(range(16)))  # every reply proves a partition


def _tensors(wire: tuple[dict, dict], kind: int = ROUND_REPLY) -> dict[str, torch.Tensor]:
    """The named tensors inside a message's packed array."""
    return read_message(*wire, kind)[1]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sym(d: int, n: int = 50, seed: int = 0) -> torch.Tensor:
    """X^T X for a seeded X (n, d), made exactly symmetric: a multithreaded BLAS does not guarantee that
    (X^T X)[i, j] == (X^T X)[j, i] bit for bit, and a packed round trip keeps only the upper triangle."""
    x = torch.randn(n, d, dtype=torch.float64, generator=_gen(seed))
    g = x.T @ x
    return (g + g.T) / 2  # a + b == b + a in floating point: exactly symmetric


def test_symmetric_pack_round_trip_and_size():
    g = _sym(7)
    packed = pack_symmetric(g)
    assert packed.numel() == 7 * 8 // 2
    assert torch.equal(unpack_symmetric(packed, 7), g)
    with pytest.raises(ValueError, match="d=8"):
        unpack_symmetric(packed, 8)


def test_flatten_keeps_names_apart():
    flat = flatten("A", {"x.y": torch.ones(2)}) | flatten("AB", {"x.y": torch.zeros(2)})
    assert torch.equal(unflatten("A", flat)["x.y"], torch.ones(2))
    assert list(unflatten("AB", flat)) == ["x.y"]


def _order(**kw) -> RoundOrder:
    g = _gen(1)
    base = dict(task=1, round=2, factor="B", block=(5, 9), A={"l1": torch.randn(2, 6, generator=g)},
                B={"l1": torch.randn(3, 2, generator=g)},
                past=[({"l1": torch.randn(2, 6, generator=g)}, {"l1": torch.randn(3, 2, generator=g)})],
                head_weight=torch.ones(4, 8), head_bias=torch.zeros(4))
    return RoundOrder(**(base | kw))


def test_round_order_round_trip():
    order = _order()
    arrays, config = order.to_wire()
    back = RoundOrder.from_wire(arrays, config, ROUND_ORDER)
    assert (back.task, back.round, back.factor, back.block) == (1, 2, "B", (5, 9))
    assert torch.equal(back.A["l1"], order.A["l1"]) and torch.equal(back.past[0][1]["l1"], order.past[0][1]["l1"])
    assert torch.equal(back.head_weight, torch.ones(4, 8))
    grams_arrays, grams_config = _order(factor="", head_weight=None, head_bias=None).to_wire()
    assert RoundOrder.from_wire(grams_arrays, grams_config, GRAMS_ORDER).factor == ""


def _with_manifest(config: dict, **changes) -> dict:
    m = Manifest.FromString(config[MANIFEST_KEY])
    for k, v in changes.items():
        setattr(m, k, v)
    return {MANIFEST_KEY: m.SerializeToString()}


def test_manifest_refuses_version_kind_factor_and_array_mismatch():
    arrays, config = _order().to_wire()
    with pytest.raises(ProtocolError, match="schema version"):
        RoundOrder.from_wire(arrays, _with_manifest(config, schema_version=SCHEMA_VERSION + 1), ROUND_ORDER)
    with pytest.raises(ProtocolError, match="expected a GRAMS_ORDER"):
        RoundOrder.from_wire(arrays, config, GRAMS_ORDER)
    with pytest.raises(ProtocolError, match="factor"):
        RoundOrder.from_wire(arrays, _with_manifest(config, factor="C"), ROUND_ORDER)
    with pytest.raises(ProtocolError, match="expected the one array 'packed'"):
        RoundOrder.from_wire(arrays | {"A/l2": torch.zeros(2, 6)}, config, ROUND_ORDER)
    with pytest.raises(ProtocolError, match="belong to no array"):
        RoundOrder.from_wire({PACKED_KEY: torch.cat([arrays[PACKED_KEY], torch.zeros(4, dtype=torch.uint8)])},
                             config, ROUND_ORDER)
    with pytest.raises(ProtocolError, match="no LoRM manifest"):
        RoundOrder.from_wire(arrays, {}, ROUND_ORDER)
    with pytest.raises(ProtocolError, match="unreadable"):
        RoundOrder.from_wire(arrays, {MANIFEST_KEY: b"\xff\xff\xff"}, ROUND_ORDER)


def test_client_reply_round_trip_with_packed_head_gram():
    g = _gen(2)
    head_gram = _sym(4, seed=2)
    diag = (torch.randn(40, 4, dtype=torch.float64, generator=g) ** 2).sum(0)
    reply = ClientReply(partition=PART, task=0, round=1, factor="A", num_examples=40,
                        grams={"l1": diag, "head": head_gram},
                        trained={"A": {"l1": torch.randn(2, 4, generator=g)}}, head_weight=torch.randn(3, 4, generator=g),
                        head_bias=torch.randn(3, generator=g), train_loss=0.5)
    arrays, config = reply.to_wire(torch.float64)
    assert _tensors((arrays, config))["gram/head"].shape == (10,)  # packed triangle, not 16 numbers
    back = ClientReply.from_wire(arrays, config, ROUND_REPLY)
    assert torch.equal(back.grams["head"], head_gram) and torch.equal(back.grams["l1"], diag)
    assert back.num_examples == 40 and back.train_loss == 0.5
    # float32 transport halves the bytes and stays within float32 precision
    arrays32, config32 = reply.to_wire(torch.float32)
    back32 = ClientReply.from_wire(arrays32, config32, ROUND_REPLY)
    assert back32.grams["head"].dtype == torch.float64
    torch.testing.assert_close(back32.grams["head"], head_gram, rtol=1e-6, atol=1e-5)


def _head_reply(G: torch.Tensor, alpha: float) -> ClientReply:
    g = _gen(3)
    return ClientReply(partition=PART, task=0, round=1, factor="A", num_examples=9, grams={"head": G},
                       trained={"A": {}},
                       head_weight=torch.randn(3, G.shape[0], generator=g), head_bias=torch.randn(3, generator=g),
                       low_rank={"head": alpha})


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_low_rank_head_gram_is_exact_and_smaller(alpha):
    """A head Gram of 9 images in 64 features has rank 9: (64, 9) numbers instead of the 2080 of the triangle."""
    g = _gen(4)
    X = torch.randn(9, 64, dtype=torch.float64, generator=g) * torch.rand(64, dtype=torch.float64, generator=g) * 10
    X[:, [3, 40]] = 0  # features no image activates (ReLU): their rows and columns must come back exactly 0
    G = shrink(X.T @ X, alpha)
    F = low_rank_factor(G, alpha)
    assert F is not None and F.shape == (64, 9)
    assert (F[[3, 40]] == 0).all()
    torch.testing.assert_close(shrink(F @ F.T, alpha), G, rtol=1e-12, atol=1e-10 * G.abs().max().item())
    arrays, config = _head_reply(G, alpha).to_wire(torch.float32)
    assert _tensors((arrays, config))["gram/head"].shape == (64, 9)
    back = ClientReply.from_wire(arrays, config, ROUND_REPLY).grams["head"]
    torch.testing.assert_close(back, G, rtol=1e-5, atol=1e-5 * G.abs().max().item())
    check_gram("c", "head", back, torch.finfo(torch.float32).eps)
    assert (back[[3, 40]] == 0).all() and (back[:, [3, 40]] == 0).all()
    # Changing the shrinkage on the wire changes the statistic: it is really used, not a label.
    assert not torch.allclose(shrink(F @ F.T, alpha / 2), G)


def test_full_rank_or_zero_head_gram_stays_packed():
    full = _sym(8, n=50)
    assert low_rank_factor(shrink(full, 0.5), 0.5) is None
    assert low_rank_factor(torch.zeros(8, 8, dtype=torch.float64), 0.5) is None
    assert _tensors(_head_reply(shrink(full, 0.5), 0.5).to_wire(torch.float32))["gram/head"].shape == (36,)
    with pytest.raises(GramError):
        low_rank_factor(full, 0.0)


def test_an_eigensolver_failure_falls_back_to_the_packed_form(monkeypatch):
    """LAPACK's eigh can fail to converge on badly scaled Grams; the reply must still go out, exact."""
    G = shrink(_sym(16, n=3, seed=5), 0.5)
    assert _tensors(_head_reply(G, 0.5).to_wire(torch.float64))["gram/head"].shape == (16, 3)  # rank 3: low-rank

    def no_convergence(*args, **kwargs):
        raise torch.linalg.LinAlgError("the algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", no_convergence)
    arrays, config = _head_reply(G, 0.5).to_wire(torch.float64)
    assert _tensors((arrays, config))["gram/head"].shape == (136,)
    assert torch.equal(ClientReply.from_wire(arrays, config, ROUND_REPLY).grams["head"], G)


def test_low_rank_gram_with_bad_shape_or_shrinkage_is_refused():
    arrays, config = _head_reply(shrink(_sym(16, n=3, seed=6), 0.5), 0.5).to_wire(torch.float32)
    with pytest.raises(ProtocolError, match="form"):
        m = Manifest.FromString(config[MANIFEST_KEY])
        m.grams[0].shrinkage = 0.0
        ClientReply.from_wire(arrays, {MANIFEST_KEY: m.SerializeToString()}, ROUND_REPLY)
    with pytest.raises(ProtocolError, match="form"):
        m = Manifest.FromString(config[MANIFEST_KEY])
        m.grams[0].d_in = 15
        ClientReply.from_wire(arrays, {MANIFEST_KEY: m.SerializeToString()}, ROUND_REPLY)


def test_projected_grams_travel_as_packed_r_by_r_and_are_marked():
    g = _gen(7)
    P = _sym(3, seed=7)
    reply = ClientReply(partition=PART, task=1, round=0, factor="B", num_examples=9, grams={"l1": P},
                        trained={"B": {"l1": torch.randn(5, 3, generator=g)}}, head_weight=torch.randn(2, 4, generator=g),
                        head_bias=torch.randn(2, generator=g), projected=frozenset({"l1"}))
    arrays, config = reply.to_wire(torch.float64)
    assert _tensors((arrays, config))["gram/l1"].shape == (6,)
    back = ClientReply.from_wire(arrays, config, ROUND_REPLY)
    assert back.projected == {"l1"} and torch.equal(back.grams["l1"], P)


def test_integer_statistics_are_refused():
    g = _gen(8)
    reply = ClientReply(partition=PART, task=0, round=1, factor="A", num_examples=4, grams={"l1": torch.ones(4)},
                        trained={"A": {"l1": torch.randn(2, 4, generator=g)}}, head_weight=torch.randn(1, 4, generator=g),
                        head_bias=torch.randn(1, generator=g))
    arrays, config = reply.to_wire(torch.float32)
    manifest = Manifest.FromString(config[MANIFEST_KEY])
    for spec in manifest.tensors:
        if spec.key == "gram/l1":
            spec.dtype = "int32"  # same size as float32: only the dtype is wrong
    with pytest.raises(ProtocolError, match="array 'gram/l1': dtype 'int32' is not one of"):
        ClientReply.from_wire(arrays, {MANIFEST_KEY: manifest.SerializeToString()}, ROUND_REPLY)


def test_generated_manifest_module_matches_the_schema(tmp_path):
    """common/lorm_manifest_pb2.py is compiler output: regenerating it from proto/ must give the same file."""
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}",
         str(ROOT / "proto" / "lorm_manifest.proto")],
        check=True,
    )
    assert (tmp_path / "lorm_manifest_pb2.py").read_text() == (ROOT / "common" / "lorm_manifest_pb2.py").read_text()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_gram_transport_is_scaled_into_range_and_passes_validation(dtype):
    """A Gram of many tokens exceeds float16's range (65504): it travels divided by max|G|."""
    from common.validation import check_gram

    g = _gen(9)
    x = torch.randn(5000, 6, dtype=torch.float64, generator=g) * 30  # rank-deficient after adding 2 zero features
    x = torch.cat([x, torch.zeros(5000, 2, dtype=torch.float64)], 1)
    G = x.T @ x
    assert G.max() > 65504
    reply = ClientReply(partition=PART, task=0, round=1, factor="A", num_examples=5000, grams={"head": G},
                        trained={"A": {"l1": torch.randn(2, 4, generator=g)}}, head_weight=torch.randn(1, 8, generator=g),
                        head_bias=torch.randn(1, generator=g))
    arrays, config = reply.to_wire(dtype)
    wire = _tensors((arrays, config))["gram/head"]
    assert wire.dtype == dtype and wire.numel() == 36
    back = ClientReply.from_wire(arrays, config, ROUND_REPLY)
    assert back.gram_wire_dtype == dtype and torch.isfinite(back.grams["head"]).all()
    eps = torch.finfo(dtype).eps
    assert ((back.grams["head"] - G).abs().max() / G.abs().max()) < eps
    check_gram("1", "head", back.grams["head"], eps)


def test_a_reply_proves_its_partition_and_one_without_is_refused():
    reply = _head_reply(torch.eye(3, dtype=torch.float64), 0.0)
    arrays, config = reply.to_wire(torch.float32)
    assert ClientReply.from_wire(arrays, config, ROUND_REPLY).partition == PART
    m = Manifest.FromString(config[MANIFEST_KEY])
    m.ClearField("partition")
    with pytest.raises(ProtocolError, match="reply carries no partition"):
        ClientReply.from_wire(arrays, {MANIFEST_KEY: m.SerializeToString()}, ROUND_REPLY)


def test_the_start_up_check_is_a_manifest_only_exchange():
    arrays, config = check_order()
    assert arrays[PACKED_KEY].numel() == 0 and read_manifest(arrays, config, CHECK_ORDER).kind == CHECK_ORDER
    withheld = NodeCheck(Partition(-1, 4), 0)
    for check in (NodeCheck(PART, 37), withheld):
        assert NodeCheck.from_wire(*check.to_wire()) == check
    assert withheld.partition.withheld and str(withheld.partition) == "partition ?/4"
