"""Speed and memory of ``match()``: faithful path vs fast path, measured side by side in one run.

Each variant runs in a fresh subprocess (so peak resident memory is that of a process doing the
match), with the same synthetic weights (the parity-fixture recipe; the official weights are not
needed to measure speed), the same image pair and the same thread count. Prints median wall times,
peak memory, the ratios against the faithful path (time: faithful / variant, a speed-up; memory:
variant / faithful) and the largest deviation of each fast variant from the faithful output.

    python bench/match_speed.py                    # CPU, 2 threads, dkm_base at 384x512
    python bench/match_speed.py --repeats 5 --batches 1 2 4
    python bench/match_speed.py --repeats 3 --rounds 3   # 3 interleaved processes per variant (noisy machines)
    python bench/match_speed.py --device cuda      # float16 instead of bfloat16 for the reduced variant
    python bench/match_speed.py --lowp-dtype float16   # float16 on a CPU (oneDNN with AVX512-FP16, fast with AMX-FP16)
    python bench/match_speed.py --arch dkm_base dkmv3_indoor   # v11 at 384x512 next to DKMv3 indoor at 480x640
    python bench/match_speed.py --release-code ~/src/DKM    # also the v11 release's own code (a checkout of 988ccbc)

Each architecture runs at its own default resolution unless --h/--w are given. DKMv3 matches both
directions in one match() (symmetric), so its cycle-consistency variants (a v11 option) are skipped;
its deviation is measured on all four columns of its (H, 2W, 4) output.

Variants: ``faithful`` (``fast=False``, the release's operations), ``fast`` (the default path),
``fast_lowp`` (``match(dtype=bfloat16)``, float16 on CUDA or with ``--lowp-dtype float16``: the
refiners in reduced precision) and
``fast_lowp_net`` (``precision_scope="network"``: also the encoder, projections and embedding
decoder); each ``*_cc`` with ``check_cycle_consistency=True``. Reduced precision is native for bfloat16
on CPU where oneDNN has kernels for it (fast with AVX512-BF16 or AMX) and for float16 on CUDA or on a
CPU with AVX512-FP16 (faster than float32 only with AMX-FP16); on a CPU without such kernels the fast
path convolves the rounded operands with float32 kernels (float32 speed: the variants then show the
deviation only). On a GPU without kernels for the dtype the reduced-precision variants are left out
(many times slower; select them with --variants to measure that anyway). The header names the CPU
and, per dtype, "fast", "native (no faster than float32)" or "emulated"
(``dkm.utils.device.reduced_precision_support``).

Memory: ``peak MiB`` is the peak resident set of the worker process (import, weights, one match);
``match MiB`` is that peak minus the resident set just before the first match, i.e. what matching
adds on top of the imported libraries and the loaded weights, which both paths share.

Time on CPU depends on the C allocator: glibc returns freed activations to the kernel and then
page-faults them back in on every match (the "faults/match" column). ``--malloc no-trim`` runs
every variant with MALLOC_MMAP_THRESHOLD_=32 MiB and MALLOC_TRIM_THRESHOLD_=2 GiB (the settings
``dkm.utils.device.keep_freed_memory()`` applies and ``evaluate.py`` uses by default; similar in
effect to jemalloc/tcmalloc via LD_PRELOAD, PyTorch's usual CPU advice), which removes those faults.
Peak memory depends on the allocator too: glibc keeps a varying amount of freed memory (tens to a few
hundred MiB, from run to run). ``--malloc live`` (MALLOC_MMAP_THRESHOLD_ = MALLOC_TRIM_THRESHOLD_ =
1 MiB) returns every freed block of 1 MiB or more at once, so its peak column is the memory actually
live at the worst moment (its times include many more page faults).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("match_speed")

#: environment of the workers for --malloc no-trim (glibc: freed memory stays with the process)
NO_TRIM_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str((1 << 31) - 1)}  # = keep_freed_memory()
#: environment of the workers for --malloc live (glibc: every block of 1 MiB or more is its own mapping,
#: returned on free, so the peak resident set is the live tensors plus code, without allocator slack)
LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}
MALLOC_ENV = {"default": {}, "no-trim": NO_TRIM_ENV, "live": LIVE_ENV}

VARIANTS = {
    # name: (fast, cycle, reduced precision: None or match()'s precision_scope)
    "faithful": (False, False, None),
    "faithful_cc": (False, True, None),
    "fast": (True, False, None),
    "fast_cc": (True, True, None),
    "fast_lowp": (True, False, "refiners"),
    "fast_lowp_cc": (True, True, "refiners"),
    "fast_lowp_net": (True, False, "network"),
    "fast_lowp_net_cc": (True, True, "network"),
}
#: variants running the DKM v11 release's own code (``--release-code``; dkm_base only): name -> cycle consistency
RELEASE_VARIANTS = {"release": False, "release_cc": True}


def make_pair(h: int = 512, w: int = 512):
    """The parity-fixture pair: scikit-image's astronaut and a homography warp of it."""
    import cv2
    from skimage import data

    im1 = data.astronaut()
    H = np.array([[0.9, 0.05, 30.0], [-0.04, 0.95, 20.0], [1e-4, -5e-5, 1.0]])
    im2 = cv2.warpPerspective(im1, H, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return im1, im2


def rss_mib(field: str = "VmHWM") -> float:
    """Peak resident memory of this process so far (``VmHWM``; unlike ``ru_maxrss`` it does not inherit
    the parent's peak across fork/exec), or its current resident memory (``field="VmRSS"``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # macOS: bytes, Linux: KiB (peak)


def make_resident(model) -> None:
    """Read every parameter and buffer once, so that weights loaded as a memory map are resident
    before the baseline of ``match MiB`` is taken (else the first match would be charged for them)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point() and t.numel():
                t.sum()


def dkm_runner(args):
    """``run(batch) -> (warp, certainty)`` of a variant of this package, and the RSS after importing it."""
    import torch
    from PIL import Image

    import dkm

    torch.set_num_threads(args.threads)
    import_rss = rss_mib()
    fast, cycle, scope = VARIANTS[args.variant]
    dtype = None
    if scope:
        dtype = getattr(torch, lowp_dtype_name(args))
    model = dkm.build_model({"arch": args.arch, "weights": args.weights, "fast": fast, "h": args.h, "w": args.w})
    model = model.to(args.device)
    make_resident(model)
    im1, im2 = (Image.fromarray(a) for a in make_pair())
    opts = {"check_cycle_consistency": cycle, "dtype": dtype, "precision_scope": scope}

    def run(batch: int):
        if batch == 1:
            return model.match(im1, im2, **opts)
        t1 = torch.from_numpy(np.asarray(im1).copy()).permute(2, 0, 1).float().div(255)
        t2 = torch.from_numpy(np.asarray(im2).copy()).permute(2, 0, 1).float().div(255)
        return model.match(t1.expand(batch, -1, -1, -1), t2.expand(batch, -1, -1, -1), **opts)

    return run, import_rss


def release_runner(args):
    """``run(1) -> (warp, certainty)`` of the DKM v11 release's own code, from the checkout given by
    ``--release-code`` (nothing of it is copied here). The release hard-codes CUDA (``.cuda()``,
    ``device="cuda:0"``) and downloads its weights; both are redirected, in this worker process only,
    to ``--device`` and to the synthetic weights file. Batches of more than one pair are not timed
    (the release's batched mode expects already resized and normalized tensors)."""
    root = Path(args.release_code).resolve()
    sys.path.insert(0, str(root))
    import torch
    from PIL import Image

    device = torch.device(args.device)
    torch.Tensor.cuda = lambda self, *a, **k: self.to(device)
    torch.nn.Module.cuda = lambda self, *a, **k: self.to(device)
    linspace = torch.linspace

    def linspace_on_device(*a, **k):
        if k.get("device") is not None and torch.device(k["device"]).type == "cuda":
            k["device"] = device
        return linspace(*a, **k)

    torch.linspace = linspace_on_device
    torch.hub.load_state_dict_from_url = lambda url, *a, **k: torch.load(args.weights, map_location="cpu",
                                                                         weights_only=True)
    import dkm as release

    if not Path(release.__file__).resolve().is_relative_to(root):
        raise SystemExit(f"--release-code {root}: imported dkm from {release.__file__}, not from the checkout")
    from dkm.models.build_model import dkm_base

    torch.set_num_threads(args.threads)
    import_rss = rss_mib()
    model = dkm_base(pretrained=True)  # builds its ResNet without ImageNet weights, then loads args.weights
    model.h_resized, model.w_resized = args.h, args.w
    make_resident(model)
    im1, im2 = (Image.fromarray(a) for a in make_pair())
    cycle = args.variant == "release_cc"

    def run(batch: int):
        if batch != 1:
            raise ValueError("the release variants time single pairs only")
        return model.match(im1, im2, check_cycle_consistency=cycle)

    return run, import_rss


def worker(args) -> None:
    import_rss_before = rss_mib()
    run, import_rss = (release_runner if args.variant in RELEASE_VARIANTS else dkm_runner)(args)

    def timed_run(batch: int):
        out = run(batch)
        if args.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        return out

    loaded_rss = rss_mib("VmRSS")  # imported, weights loaded, nothing matched yet
    gpu = args.device.startswith("cuda")
    if gpu:
        import torch

        torch.cuda.reset_peak_memory_stats(args.device)
        gpu_loaded = torch.cuda.memory_allocated(args.device) / 2**20
    t0 = time.perf_counter()
    warp, cert = timed_run(1)
    first = time.perf_counter() - t0
    peak_one_match = rss_mib()
    gpu_peak = torch.cuda.max_memory_allocated(args.device) / 2**20 if gpu else None  # tensors, one match
    times, faults = {}, {}
    for b in args.batches if args.variant not in RELEASE_VARIANTS else [1]:
        ts, fs = [], []
        for _ in range(args.repeats):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            timed_run(b)
            ts.append(time.perf_counter() - t0)
            fs.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        times[b], faults[b] = statistics.median(ts), statistics.median(fs)
    np.savez(args.out, warp=warp.float().cpu().numpy(), cert=cert.float().cpu().numpy())
    print(json.dumps({
        "variant": args.variant, "first": first, "median": times, "minor_faults": faults, "peak_rss_mib": peak_one_match,
        "rss_before_torch_mib": import_rss_before, "rss_after_import_mib": import_rss, "rss_loaded_mib": loaded_rss,
        "gpu_peak_mib": gpu_peak, "gpu_match_mib": gpu_peak - gpu_loaded if gpu else None,
    }))


def lowp_dtype_name(args) -> str:
    """The reduced-precision dtype of the ``fast_lowp*`` variants: ``--lowp-dtype``, by default float16
    on CUDA and bfloat16 on CPU."""
    return args.lowp_dtype or ("float16" if args.device.startswith("cuda") else "bfloat16")


def arch_info(arch: str):
    """(default h, default w, is DKMv3) of an architecture of the zoo."""
    from dkm.models.zoo import ARCHITECTURES, build_dkm
    import inspect

    spec = ARCHITECTURES[arch]
    defaults = inspect.signature(build_dkm).parameters
    h = spec.get("h", defaults["h"].default)
    w = spec.get("w", defaults["w"].default)
    return h, w, spec.get("version") == "v3"


def combine_rounds(rounds: list[dict]) -> dict:
    """One worker result from several rounds: medians of the per-round medians, faults and peaks."""
    out = dict(rounds[0])
    for key in ("median", "minor_faults"):
        out[key] = {b: statistics.median(r[key][b] for r in rounds) for b in rounds[0][key]}
    for key in ("peak_rss_mib", "rss_loaded_mib"):
        out[key] = statistics.median(r[key] for r in rounds)
    out["match_mib"] = statistics.median(r["peak_rss_mib"] - r["rss_loaded_mib"] for r in rounds)
    for key in ("gpu_peak_mib", "gpu_match_mib"):
        out[key] = statistics.median(r[key] for r in rounds) if rounds[0].get(key) is not None else None
    return out


def run_arch(args, arch: str, h: int, w: int, is_v3: bool) -> None:
    import torch

    import dkm
    from dkm.utils.synthetic_weights import synthetic_state_dict

    variants = [v for v in args.variants if not (is_v3 and v.endswith("_cc"))]
    if args.release_code:
        if arch == "dkm_base":
            variants += [r for r, cycle in RELEASE_VARIANTS.items() if any(v.endswith("_cc") == cycle for v in variants)]
        else:
            log.info("--release-code: the release code builds dkm_base only; no release variants for %s", arch)
    env = os.environ | MALLOC_ENV[args.malloc]
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "synthetic.pth"
        shapes = dkm.build_model({"arch": arch, "h": h, "w": w}).state_dict()
        torch.save(synthetic_state_dict(shapes, seed=0), weights)
        rounds = {v: [] for v in variants}
        failed = {}  # variant -> why it has no result (a timeout; for the release's code also an error)
        for r in range(args.rounds):  # variants interleaved, so that a drifting machine load hits all alike
            for v in variants:
                out = Path(tmp) / f"{v}.npz"
                cmd = [sys.executable, __file__, "--variant", v, "--weights", str(weights), "--out", str(out),
                       "--arch", arch, "--h", str(h), "--w", str(w), "--device", args.device,
                       "--threads", str(args.threads), "--repeats", str(args.repeats),
                       "--lowp-dtype", lowp_dtype_name(args),
                       "--batches", *map(str, args.batches)]
                if v in RELEASE_VARIANTS:
                    cmd += ["--release-code", args.release_code]
                if v in failed:
                    continue
                log.info("running %s %s (round %d of %d) ...", arch, v, r + 1, args.rounds)
                try:
                    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    failed[v] = f"no result within --timeout {args.timeout:.0f} s"
                    log.warning("%s %s: %s", arch, v, failed[v])
                    continue
                if res.returncode != 0:
                    if v not in RELEASE_VARIANTS:
                        raise SystemExit(f"variant {v} of {arch} failed:\n{res.stderr}")
                    failed[v] = f"failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}"
                    log.warning("%s %s %s", arch, v, failed[v])
                    continue
                rounds[v].append(json.loads(res.stdout.strip().splitlines()[-1]))
                outputs[v] = dict(np.load(out))
        results = {v: combine_rounds(rs) for v, rs in rounds.items() if v not in failed}

    from dkm.utils.device import cpu_description

    where = f"{args.device} ({cpu_description()})" if args.device == "cpu" else args.device
    print(f"\nmatch() on {arch} at {h}x{w}, {where}, {args.threads} threads, malloc {args.malloc}, "
          f"median of {args.repeats} repeats x {args.rounds} round(s) (pair: astronaut + homography, synthetic weights; "
          f"fast_lowp*: {lowp_dtype_name(args)})")
    print(f"{'variant':<16} {'s/match':>8} {'faults/match':>12} {'speed-up':>11} {'peak MiB':>9} {'vs faithful':>11} "
          f"{'match MiB':>9} {'vs faithful':>11} {'max dflow px':>12} {'p99 dflow px':>12} {'max dcert':>9}")
    for v, r in results.items():
        base = "faithful_cc" if v.endswith("_cc") else "faithful"
        t = r["median"]["1"]
        line = f"{v:<16} {t:8.3f} {r['minor_faults']['1']:12.0f}"
        if base in results:
            tb, mb, ab = results[base]["median"]["1"], results[base]["peak_rss_mib"], results[base]["match_mib"]
            line += (f" {tb / t:10.2f}x {r['peak_rss_mib']:9.0f} {r['peak_rss_mib'] / mb:10.2f}x"
                     f" {r['match_mib']:9.0f} {r['match_mib'] / ab:10.2f}x")
            wv, wb = outputs[v]["warp"], outputs[base]["warp"]
            ho, wo = wv.shape[-3], wv.shape[-2] // (2 if is_v3 else 1)  # output grid of one direction
            if is_v3:  # [grid_q, q->s | s->q, grid_s]: every column can move
                d = np.abs(wv - wb) * np.array([wo / 2, ho / 2, wo / 2, ho / 2])
            else:
                d = np.abs(wv[..., 2:] - wb[..., 2:]) * np.array([wo / 2, ho / 2])
            dflow = d.max(-1)
            dcert = np.abs(outputs[v]["cert"] - outputs[base]["cert"]).max()
            line += f" {dflow.max():12.4f} {np.quantile(dflow, 0.99):12.4f} {dcert:9.2e}"
        else:
            line += f" {'':>11} {r['peak_rss_mib']:9.0f} {'':>11} {r['match_mib']:9.0f}"
        print(line)
    for v, why in failed.items():
        print(f"{v:<16} {why}")
    if any(r.get("gpu_peak_mib") is not None for r in results.values()):
        print("\nGPU memory (torch.cuda.max_memory_allocated over the first match; the columns above are host RSS):")
        print(f"{'variant':<16} {'peak MiB':>9} {'vs faithful':>11} {'match MiB':>9} {'vs faithful':>11}")
        for v, r in results.items():
            base = results.get("faithful_cc" if v.endswith("_cc") else "faithful")
            vs = (lambda k: f"{r[k] / base[k]:10.2f}x" if base and base.get(k) else f"{'':>11}")  # noqa: E731
            print(f"{v:<16} {r['gpu_peak_mib']:9.0f} {vs('gpu_peak_mib')} {r['gpu_match_mib']:9.0f} {vs('gpu_match_mib')}")
    if len(args.batches) > 1:
        print("\nseconds per pair by batch size B (match() on a batch of B pairs, divided by B):")
        print(f"{'variant':<16} " + " ".join(f"{'B=' + str(b):>8}" for b in args.batches))
        for v, r in results.items():
            print(f"{v:<16} " + " ".join(f"{r['median'][str(b)] / b:8.3f}" if str(b) in r["median"] else f"{'-':>8}"
                                          for b in args.batches))
    for rel in (r for r in RELEASE_VARIANTS if r in results):
        tr, mr = results[rel]["median"]["1"], results[rel]["peak_rss_mib"]
        others = [v for v in results if v not in RELEASE_VARIANTS and v.endswith("_cc") == RELEASE_VARIANTS[rel]]
        print(f"\nagainst the release's own code ({rel}: {tr:.3f} s/match, peak {mr:.0f} MiB): "
              + ", ".join(f"{v} {tr / results[v]['median']['1']:.2f}x the speed, {results[v]['peak_rss_mib'] / mr:.2f}x memory"
                          for v in others))
    if not results:
        return
    imp = next(iter(results.values()))["rss_after_import_mib"]
    loaded = next(iter(results.values()))["rss_loaded_mib"]
    print(f"\n(peak MiB: max resident set of a process that imports dkm, loads the weights and runs one "
          f"match; importing torch+dkm alone: {imp:.0f} MiB, with the weights loaded and resident: {loaded:.0f} MiB. "
          f"match MiB: that peak minus the resident set just before the first match, i.e. what the match "
          f"itself adds: activations, allocator slack, oneDNN's code and caches)")
    for base in ("faithful", "faithful_cc"):
        if base in results:  # what no path can go below: import and weights are the same for all of them
            print(f"lowest process peak any variant could reach against {base}: {loaded:.0f} MiB (imported, weights "
                  f"resident, nothing matched) = {loaded / results[base]['peak_rss_mib']:.2f}x its peak")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["dkm_base"],
                   help="architectures of the zoo, run one after the other (e.g. dkm_base dkmv3_indoor)")
    p.add_argument("--h", type=int, default=None, help="internal height (default: the architecture's)")
    p.add_argument("--w", type=int, default=None, help="internal width (default: the architecture's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed matches per worker process")
    p.add_argument("--rounds", type=int, default=1,
                   help="worker processes per variant, run interleaved; medians over rounds are reported")
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--lowp-dtype", choices=["bfloat16", "float16"], default=None,
                   help="dtype of the fast_lowp* variants (default: float16 on CUDA, bfloat16 on CPU; float16 on a "
                        "CPU runs in oneDNN with AVX512-FP16, faster than float32 with AMX-FP16)")
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                   help="default: all (on a GPU without kernels for the reduced dtype: all but the reduced-precision ones)")
    p.add_argument("--malloc", choices=list(MALLOC_ENV), default="default",
                   help="no-trim: glibc keeps freed memory (no page faults per match); live: glibc returns "
                        "every freed block of 1 MiB or more at once (peak = live memory; see above)")
    p.add_argument("--release-code", default=None, metavar="DIR",
                   help="a checkout of the DKM v11 release (github.com/Parskatt/DKM at commit 988ccbc): adds the "
                        "variants release/release_cc, which run its own dkm_base code on the same weights and pair")
    p.add_argument("--timeout", type=float, default=900,
                   help="seconds per worker process; a variant without a result by then is reported as such")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        args.arch = args.arch[0]
        return worker(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from dkm.models.zoo import ARCHITECTURES

    unknown = [a for a in args.arch if a not in ARCHITECTURES]
    if unknown:
        p.error(f"--arch {' '.join(unknown)}: expected architectures of the zoo: {' '.join(sorted(ARCHITECTURES))}")
    args.batches = sorted({1, *args.batches})  # the main table is of single matches
    inherited = sorted(k for k in os.environ if k.startswith("MALLOC_"))
    if args.malloc == "default" and inherited:
        log.warning("--malloc default, but this shell sets %s: the workers inherit it", ", ".join(inherited))
    if args.release_code:
        args.release_code = str(Path(args.release_code).expanduser().resolve())
        if not (Path(args.release_code) / "dkm" / "models" / "build_model.py").is_file():
            raise SystemExit(f"--release-code {args.release_code}: no dkm/models/build_model.py there; expected a "
                             "checkout of github.com/Parskatt/DKM at the v11 release (git checkout 988ccbc)")
    if args.variants is None:
        import torch

        from dkm.utils.device import reduced_precision_is_native

        lowp = getattr(torch, lowp_dtype_name(args))
        args.variants = list(VARIANTS)
        if args.device != "cpu" and not reduced_precision_is_native(args.device, lowp):
            args.variants = [v for v in VARIANTS if not VARIANTS[v][2]]
            log.info("%s is emulated on this %s: skipping the reduced-precision variants (--variants to force)",
                     lowp, args.device)
    for arch in args.arch:
        h, w, is_v3 = arch_info(arch)
        run_arch(args, arch, args.h or h, args.w or w, is_v3)


if __name__ == "__main__":
    main()
