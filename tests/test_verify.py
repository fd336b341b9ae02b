"""Update verification on a hand-built round directory: what gets in, what is kept out, and why."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch

from fedhpc.config.federation import Config, SiteConfig
from fedhpc.core.files import read_json, sha256_file, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.core.tensorfile import save_state
from fedhpc.stages.verify import verify_round
from fedhpc.trust.audit import AuditLog, verify_ledger
from fedhpc.trust.checkpoints import load_global_meta, publish_global
from fedhpc.trust.identity import create_keypair
from fedhpc.trust.signing import COORDINATOR, SignatureError, TrustStore, sign_document, verify_document

RUN = "t"


def small_state(seed: int) -> dict[str, torch.Tensor]:
    """A tiny 'model': two fp32 tensors of fixed shapes, values from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return {"b": torch.randn(3, generator=g), "w": torch.randn(4, 3, generator=g)}


class RoundBuilder:
    """Writes by hand what the pipeline would have written for round `r` of run `t`.

    Everything is real: Ed25519 keys, a coordinator-signed global model (of round r and of
    r-1, so a stale base exists) and plan, site-signed receipts whose update_sha256 is the
    sha256 of the update file. Also used by test_aggregate.py.
    """

    def __init__(
        self,
        root: Path,
        sites: Iterable[str],
        r: int = 1,
        run: str = RUN,
        global_state: dict[str, torch.Tensor] | None = None,
        created: float = 1000.0,
    ):
        self.sites = list(sites)
        self.r, self.run = r, run
        self.layout = RunLayout.of(root / "run")
        for name in [COORDINATOR, *self.sites]:
            create_keypair(self.layout.keys_dir, name)
        self.trust = TrustStore(self.layout.keys_dir)
        self.globals: dict[int, dict] = {}
        for k in range(r + 1):
            state = global_state if (k == r and global_state is not None) else small_state(100 + k)
            save_state(self.layout.global_model(k), state, {"run": run, "round": str(k)})
            self.globals[k] = publish_global(
                self.layout,
                self.trust,
                k,
                self.layout.global_model(k),
                {"run": run, "source": "test", "vocab_size": 16},
            )
        self.base = self.globals[r]
        plan = {
            "round": r,
            "run": run,
            "created": created,
            "participants": self.sites,
            "sites": {s: {"shards": [f"{s}-shard"], "tokens": 1000} for s in self.sites},
        }
        write_json(self.layout.plan(r), sign_document(plan, COORDINATOR, self.trust.private_key(COORDINATOR)))

    def config(self, **verification: Any) -> Config:
        cfg = Config(run=self.run, sites={s: SiteConfig() for s in self.sites})
        for k, v in verification.items():
            setattr(cfg.verification, k, v)
        return cfg

    def good_update(self, site: str, scale: float = 1e-2) -> dict[str, torch.Tensor]:
        """A plausible update: small random deltas, different for every site."""
        return {k: scale * v for k, v in small_state(sum(map(ord, site))).items()}

    def publish(
        self,
        who: str,
        /,
        update: dict[str, torch.Tensor] | None = None,
        *,
        signer: str | None = None,
        key_of: str | None = None,
        sign: bool = True,
        metadata: dict[str, str] | None = None,
        **receipt_fields: Any,
    ) -> dict[str, Any]:
        """Write update.safetensors and receipt.json for site `who`. The receipt is signed as `signer`
        (default: `who`) with the private key of `key_of` (default: the signer)."""
        update_path = self.layout.update(self.r, who)
        save_state(
            update_path,
            self.good_update(who) if update is None else update,
            {"run": self.run, "round": str(self.r), "site": who, **(metadata or {})},
        )
        rec = {
            "run": self.run,
            "round": self.r,
            "site": who,
            "base_round": self.r,
            "base_sha256": self.base["sha256"],
            "update_sha256": sha256_file(update_path),
            "shards": self.planned_shards(who),
            "tokens": 1000,
            "sequences": 10,
            "steps": 4,
            "loss_before": 3.0,
            "loss_after": 2.5,
            **receipt_fields,
        }
        if sign:
            signer = signer or who
            rec = sign_document(rec, signer, self.trust.private_key(key_of or signer))
        write_json(self.layout.receipt(self.r, who), rec)
        return rec

    def planned_shards(self, who: str) -> list[str]:
        """The shards round r's plan gave `who` (what a real site's receipt lists)."""
        entry = read_json(self.layout.plan(self.r))["sites"].get(who) if self.layout.plan(self.r).exists() else None
        return entry["shards"] if entry else [f"{who}-shard"]

    def write_arrivals(self, arrived: list[str] | None = None) -> None:
        arrived = self.sites if arrived is None else arrived
        write_json(
            self.layout.arrivals(self.r),
            {
                "round": self.r,
                "planned": self.sites,
                "arrived": arrived,
                "missing": [s for s in self.sites if s not in arrived],
            },
        )

    def verify(self, **verification: Any) -> dict:
        return verify_round(
            self.config(**verification),
            self.layout,
            self.trust,
            self.r,
            load_global_meta(self.layout, self.trust, self.r),
        )


@pytest.fixture()
def builder(tmp_path: Path) -> Callable[..., RoundBuilder]:
    return lambda sites, **kw: RoundBuilder(tmp_path, sites, **kw)


GOOD = ["good1", "good2", "good3"]


def verdict(b: RoundBuilder, site: str) -> dict:
    """The verdict file of `site`, after checking it is signed by the coordinator."""
    doc = read_json(b.layout.verdict(b.r, site))
    verify_document(doc, b.trust, COORDINATOR, f"verdict of {site}")
    return doc


def verdict_events(b: RoundBuilder) -> list[dict]:
    return [e for e in AuditLog(b.layout.audit).events() if e["event"] == "update.verdict"]


# ---------------------------------------------------------------- the good path


def test_good_updates_are_accepted_with_signed_verdicts_and_one_audit_event_each(builder):
    b = builder(GOOD + ["good4"])
    for s in b.sites:
        b.publish(s)
    b.write_arrivals()
    summary = b.verify()
    assert summary["accepted"] == GOOD + ["good4"] and summary["rejected"] == {}
    assert summary["update_sha256"] == {s: sha256_file(b.layout.update(1, s)) for s in b.sites}
    assert read_json(b.layout.verdicts(1)) == summary
    for s in b.sites:
        v = verdict(b, s)
        assert v["accepted"] is True and v["reasons"] == [] and v["flags"] == []
        assert v["round"] == 1 and v["site"] == s and v["tokens"] == 1000 and v["steps"] == 4
        # The recorded norm is the L2 norm over every tensor of the update.
        u = b.good_update(s)
        assert v["norm"] == pytest.approx(math.sqrt(sum(float((t.double() ** 2).sum()) for t in u.values())), rel=1e-12)
        assert v["outlier_z"] < 4
    events = verdict_events(b)
    assert [(e["site"], e["accepted"], e["round"]) for e in events] == [(s, True, 1) for s in b.sites]
    assert verify_ledger(b.layout.audit).ok


def test_only_arrived_sites_get_a_verdict(builder):
    b = builder(GOOD + ["late"])
    for s in GOOD:
        b.publish(s)
    b.write_arrivals(GOOD)
    assert b.verify()["accepted"] == GOOD
    assert not b.layout.verdict(1, "late").exists()
    assert sorted(e["site"] for e in verdict_events(b)) == GOOD


# ---------------------------------------------------------------- one bad site among three good ones


def _flip_last_byte(b: RoundBuilder, site: str) -> None:
    b.publish(site)  # signed receipt first, then the bytes change
    path = b.layout.update(b.r, site)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _with(change: Callable[[dict], None]) -> Callable[[RoundBuilder, str], None]:
    def fault(b: RoundBuilder, site: str) -> None:
        u = b.good_update(site)
        change(u)
        b.publish(site, u)

    return fault


def _set(name, idx, value):
    def change(u):
        u[name][idx] = value

    return change


def _unparseable_receipt(b: RoundBuilder, site: str) -> None:
    b.publish(site)
    b.layout.receipt(b.r, site).write_text('{"run": "t", "round": ')


def _missing_update(b: RoundBuilder, site: str) -> None:
    b.publish(site)
    b.layout.update(b.r, site).unlink()


FAULTS = {
    "corrupt update": (
        _flip_last_byte,
        "update.safetensors does not match the sha256 in its receipt (corrupt or tampered)",
    ),
    "update missing": (_missing_update, "update.safetensors is missing"),
    "unsigned receipt": (lambda b, s: b.publish(s, sign=False), "receipt: receipt of x: unsigned"),
    "signed by another site": (
        lambda b, s: b.publish(s, signer="good1"),
        "receipt: receipt of x: signed by 'good1', expected 'x'",
    ),
    "another site's key under x's name": (
        lambda b, s: b.publish(s, key_of="good1"),
        "receipt: receipt of x: signature does not verify",
    ),
    "unparseable receipt": (_unparseable_receipt, "receipt: "),
    "replayed from another round": (
        lambda b, s: b.publish(s, round=0),
        "receipt is for round 0, expected 1 (replayed or misplaced)",
    ),
    "replayed from another run": (
        lambda b, s: b.publish(s, run="other"),
        "receipt is for run 'other', expected 't' (replayed or misplaced)",
    ),
    "receipt of another site": (
        lambda b, s: b.publish(s, site="good2"),
        "receipt is for site 'good2', expected 'x' (replayed or misplaced)",
    ),
    "stale base": (
        lambda b, s: b.publish(s, base_sha256=b.globals[0]["sha256"]),
        "update was trained on a different global model (stale or wrong base)",
    ),
    "NaN": (_with(_set("w", (1, 2), float("nan"))), "tensor w has NaN or Inf values"),
    "Inf": (_with(_set("b", 0, float("-inf"))), "tensor b has NaN or Inf values"),
    "wrong shape": (
        _with(lambda u: u.update(w=u["w"].T.contiguous())),
        "tensor names/shapes/dtypes differ from the global model: w: F32[3, 4] vs expected F32[4, 3]",
    ),
    "wrong dtype": (
        _with(lambda u: u.update(w=u["w"].to(torch.bfloat16))),
        "tensor names/shapes/dtypes differ from the global model: w: BF16[4, 3] vs expected F32[4, 3]",
    ),
    "missing tensor": (_with(lambda u: u.pop("b")), "tensor names/shapes/dtypes differ from the global model: b"),
    "extra tensor": (
        _with(lambda u: u.update(head=torch.zeros(2))),
        "tensor names/shapes/dtypes differ from the global model: head",
    ),
    "diverged": (
        lambda b, s: b.publish(s, loss_before=2.0, loss_after=3.1),  # 3.1 > 2.0 * 1.5
        "diverged: local held-out loss rose from 2.0000 to 3.1000",
    ),
    "loss not reported": (
        lambda b, s: b.publish(s, loss_after=None),
        "receipt reports non-finite local losses (3.0, None)",
    ),
    "outlier norm": (lambda b, s: b.publish(s, b.good_update(s, scale=1.0)), "outlier: update norm "),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_faulty_update_is_rejected_and_the_verdict_says_why(builder, fault):
    make, reason = FAULTS[fault]
    b = builder(GOOD + ["x"])
    for s in GOOD:
        b.publish(s)
    make(b, "x")
    b.write_arrivals()
    summary = b.verify()

    assert summary["accepted"] == GOOD  # the others are unaffected
    assert list(summary["rejected"]) == ["x"]
    assert len(summary["rejected"]["x"]) >= 1 and summary["rejected"]["x"][0].startswith(reason)
    v = verdict(b, "x")
    assert v["accepted"] is False and v["reasons"] == summary["rejected"]["x"]
    assert all(verdict(b, s)["accepted"] for s in GOOD)
    events = {e["site"]: e for e in verdict_events(b)}
    assert sorted(events) == GOOD + ["x"] and len(verdict_events(b)) == 4
    assert events["x"]["accepted"] is False and events["x"]["reasons"] == v["reasons"]
    assert verify_ledger(b.layout.audit).ok


def test_a_replayed_round0_update_is_rejected_for_round_and_base(builder):
    """A genuine, correctly signed receipt of round 0 copied into round 1."""
    b = builder(GOOD + ["x"])
    for s in GOOD:
        b.publish(s)
    b.publish("x", round=0, base_round=0, base_sha256=b.globals[0]["sha256"])
    b.write_arrivals()
    assert b.verify()["rejected"]["x"] == [
        "receipt is for round 0, expected 1 (replayed or misplaced)",
        "update was trained on a different global model (stale or wrong base)",
    ]


def sign_variant(u: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Update `u` with some tensors negated (by the bits of i): the same norm to the last bit, but not
    the same update, which verification would refuse as a duplicate submission."""
    return {k: -v if (i >> j) & 1 else v for j, (k, v) in enumerate(sorted(u.items()))}


def test_outlier_z_is_the_robust_distance_in_log_norm_per_sqrt_step(builder):
    # Three sites with identical update norms and one 100x larger: median/MAD of log(norm/sqrt(steps))
    # are those of the three, the MAD is 0, so the spread is the floor min_log_scale = 0.5 and
    # z = ln(100) / 0.5 = 9.21.
    b = builder(GOOD + ["x"])
    same = b.good_update("good1")
    for i, s in enumerate(GOOD):
        b.publish(s, sign_variant(same, i))
    b.publish("x", {k: 100 * v for k, v in same.items()})
    b.write_arrivals()
    summary = b.verify()
    v = verdict(b, "x")
    assert v["outlier_z"] == pytest.approx(math.log(100) / 0.5, rel=1e-9)
    assert summary["rejected"]["x"] == [
        f"outlier: update norm {v['norm']:.4g} is 9.2 robust deviations from the other sites"
    ]
    assert [verdict(b, s)["outlier_z"] for s in GOOD] == [0.0, 0.0, 0.0]


def test_more_steps_legitimately_move_further_and_are_not_outliers(builder):
    # 100x the norm but 10^4 x the steps: the same norm per sqrt(step).
    b = builder(GOOD + ["x"])
    same = b.good_update("good1")
    for i, s in enumerate(GOOD):
        b.publish(s, sign_variant(same, i), steps=4)
    b.publish("x", {k: 100 * v for k, v in same.items()}, steps=40_000)
    b.write_arrivals()
    assert b.verify()["accepted"] == GOOD + ["x"]
    assert verdict(b, "x")["outlier_z"] == pytest.approx(0.0, abs=1e-6)  # fp32 rounding of 100x


def test_outlier_screen_needs_three_updates(builder):
    b = builder(["a", "b"])
    b.publish("a")
    b.publish("b", b.good_update("b", scale=1.0))  # 100x, but nothing to compare with
    b.write_arrivals()
    assert b.verify()["accepted"] == ["a", "b"]
    for s in ("a", "b"):
        assert verdict(b, s)["flags"] == ["outlier screen skipped: 2 updates (needs 3)"]


def test_absolute_norm_cap(builder):
    b = builder(GOOD + ["x"])
    for s in GOOD:
        b.publish(s)
    b.publish("x", b.good_update("x", scale=0.1))
    b.write_arrivals()
    norms = {s: math.sqrt(sum(float((t.double() ** 2).sum()) for t in b.good_update(s).values())) for s in GOOD}
    cap = 1.5 * max(norms.values())  # above every good update, below the 10x one
    summary = b.verify(max_update_norm=cap, outlier_z=100.0)
    assert summary["accepted"] == GOOD
    assert (
        summary["rejected"]["x"][0].startswith("update norm ")
        and "exceeds verification.max_update_norm" in summary["rejected"]["x"][0]
    )


def test_a_loss_rise_within_the_divergence_ratio_is_underfitting_not_divergence(builder):
    b = builder(GOOD + ["x"])
    for s in GOOD:
        b.publish(s)
    b.publish("x", loss_before=2.0, loss_after=3.0)  # exactly before * 1.5: not diverged
    b.write_arrivals()
    assert b.verify()["accepted"] == GOOD + ["x"]
    assert verdict(b, "x")["flags"] == ["underfitting: local held-out loss did not improve (2.0000 → 3.0000)"]


@pytest.mark.parametrize("reject_underfit", [False, True])
def test_underfitting_is_flagged_by_default_and_rejected_on_request(builder, reject_underfit):
    b = builder(GOOD + ["x"])
    for s in GOOD:
        b.publish(s)
    b.publish("x", loss_before=2.5, loss_after=2.5)
    b.write_arrivals()
    summary = b.verify(reject_underfit=reject_underfit)
    msg = "underfitting: local held-out loss did not improve (2.5000 → 2.5000)"
    v = verdict(b, "x")
    if reject_underfit:
        assert summary["accepted"] == GOOD and summary["rejected"] == {"x": [msg]}
        assert v["accepted"] is False and v["reasons"] == [msg]
    else:
        assert summary["accepted"] == GOOD + ["x"] and summary["rejected"] == {}
        assert v["accepted"] is True and v["flags"] == [msg] and v["reasons"] == []
    assert {e["site"]: e["accepted"] for e in verdict_events(b)}["x"] is (not reject_underfit)


def test_several_faulty_sites_in_one_round(builder):
    b = builder(GOOD + ["nan", "stale", "liar"])
    for s in GOOD:
        b.publish(s)
    _with(_set("w", (0, 0), float("nan")))(b, "nan")
    b.publish("stale", base_sha256="0" * 64)
    b.publish("liar", signer="good3")
    b.write_arrivals()
    summary = b.verify()
    assert summary["accepted"] == GOOD
    assert sorted(summary["rejected"]) == ["liar", "nan", "stale"]
    assert len(verdict_events(b)) == 6
    for s in b.sites:
        assert verdict(b, s)["accepted"] is (s in GOOD)


def test_a_verdict_cannot_be_altered_without_breaking_its_signature(builder):
    b = builder(GOOD)
    for s in GOOD:
        b.publish(s)
    b.write_arrivals()
    b.verify()
    doc = read_json(b.layout.verdict(1, "good1"))
    doc["accepted"] = False
    with pytest.raises(SignatureError):
        verify_document(doc, b.trust, COORDINATOR, "verdict")


@pytest.mark.parametrize(
    "losses, reason",
    [
        ([5.0, 4.0, 3.5, 3.0, 2.9], None),
        ([5.0, 4.0, 3.5, 20.0, 3.0], "training curve: loss spiked to 20 at step 4 (median before 4)"),
        ([5.0, 4.0, float("nan"), 3.0], "training curve: loss nan at step 3"),
    ],
)
def test_an_anomalous_training_curve_rejects_the_update(tmp_path, losses, reason):
    import json

    b = RoundBuilder(tmp_path, ["a", "b", "c"])
    for s in ("a", "b", "c"):
        b.publish(s)
    path = b.layout.metrics(b.r, "c")
    path.write_text("".join(json.dumps({"step": i + 1, "loss": x}) + "\n" for i, x in enumerate(losses)))
    b.write_arrivals()
    summary = b.verify()
    if reason is None:
        assert summary["accepted"] == ["a", "b", "c"]
    else:
        assert summary["rejected"]["c"] == [reason]
