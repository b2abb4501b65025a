"""ONNX Runtime backend: a `.rtsvc` bundle's DiT and vocoder behind the same interface as torch.

Providers (which exist, which start here, the automatic order) are `rtsvc.backends.providers`;
its names are re-exported here for older callers.
"""

import os
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
import torch

from rtsvc.backends.bundle import (
    DIT_FILE,
    DIT_OUTPUT,
    FAMILY_INTERFACES,
    SPEAKER_WEIGHTS_VERSION,
    VOCODER_FILE,
    VOCODER_INPUTS,
    VOCODER_OUTPUT,
    Bundle,
    read_bundle,
)
from rtsvc.backends.providers import (  # noqa: F401 - re-exported: callers import them from here
    CPU,
    GPU_PROVIDERS,
    ORT_LOG_ERRORS_ONLY,
    PROVIDER_NAMES,
    choose_providers,
    parse_providers,
    provider_report,
    provider_works,
    short_name,
)
from rtsvc.errors import UserError
from rtsvc.models.families import family_named
from rtsvc.models.flow import CFG_EPS, Conditioning
from rtsvc.models.guidance import Guidance, bad_cvec_of
from rtsvc.models.speakers import speaker_weights
from rtsvc.models.student import StudentInfo

TRT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "rtsvc", "trt")


DIRECTML = "DmlExecutionProvider"


def session_options(threads: int | None = None, providers: Sequence[str] = ()) -> ort.SessionOptions:
    """Full graph optimisation; `threads` caps intra-op threads (None: ORT uses every core)."""
    options = ort.SessionOptions()
    if DIRECTML in providers:  # ORT's DirectML notes: no memory patterns (and sequential execution, below)
        options.enable_mem_pattern = False
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1  # one graph at a time; parallelism is inside the ops
    if threads:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = ORT_LOG_ERRORS_ONLY
    # ORT's idle workers spin-wait after each run by default; torch (the feature extractors, in
    # the same process) then loses its cores to them, which made torch 5-30x slower in our
    # benchmarks on 2 cores. Sleeping workers cost ORT nothing measurable here.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _provider_entry(provider: str):
    if provider == "TensorrtExecutionProvider":
        # engines take minutes to build for a big DiT: keep them between runs
        os.makedirs(TRT_CACHE_DIR, exist_ok=True)
        return (provider, {"trt_engine_cache_enable": True, "trt_engine_cache_path": TRT_CACHE_DIR})
    return provider


def make_session(path, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession on `providers` (ORT names, from `choose_providers`; default CPU)."""
    providers = list(providers or [CPU])
    try:
        session = ort.InferenceSession(str(path), session_options(threads, providers),
                                       providers=[_provider_entry(p) for p in providers])
    except Exception as err:  # ORT raises its own types for bad or unsupported graphs
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"ONNX Runtime cannot load {path}: {first}") from None
    if providers[0] not in session.get_providers():  # ORT drops a provider that fails, with a log line
        raise UserError(f"ONNX Runtime could not start {short_name(providers[0])} for {path} (it would run "
                        f"on {', '.join(map(short_name, session.get_providers()))})")
    return session


# --- the backend ------------------------------------------------------------------------------

TORCH_TO_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def _providers_for(device: str, requested: str | Sequence[str] | None) -> list[str]:
    """`--device cpu` pins ONNX Runtime to CPU unless providers are named; `cuda` needs a GPU one."""
    if device == "cpu" and parse_providers(requested) is None:
        return [CPU]
    providers = choose_providers(requested)
    if device.startswith("cuda") and not any(p in GPU_PROVIDERS for p in providers):
        raise UserError("--device cuda was asked for but ONNX Runtime cannot start its CUDA or TensorRT "
                        "provider here (no GPU or missing CUDA libraries); try --device cpu (AMD, Intel "
                        "or Apple GPUs: --device auto and --providers, see `rtsvc doctor`)")
    return providers


class OnnxBackend:
    """`Backend` (see rtsvc/backends/base.py) over a bundle's dit.onnx and vocoder.onnx.

    Tensors come in and go out as torch tensors on `device`. On a GPU provider with CUDA torch
    they stay on the GPU: inputs and outputs are bound by pointer (IO binding), no host copies.
    """

    def __init__(self, bundle: Bundle, providers: Sequence[str], device: torch.device,
                 threads: int | None = None):
        self.bundle = bundle
        self.speakers = bundle.speakers
        self.family = bundle.family
        layers = bundle.manifest["dit"].get("cfg_skip_layers")
        self.skip_layers = None if layers is None else tuple(int(i) for i in layers)  # fixed in the V3 graph
        # format 2 graphs take speaker weights [b, num_speaker] (blends); format 1 an index [b]
        self.takes_speaker_weights = bundle.manifest["format_version"] >= SPEAKER_WEIGHTS_VERSION
        num_speaker = bundle.manifest["dit"].get("num_speaker")  # validated: null or a positive integer
        self.num_speaker = len(self.speakers) if num_speaker is None else int(num_speaker)
        self.pitch_stats = dict(bundle.manifest.get("pitch_stats") or {})  # speaker -> log-F0 stats
        self.device = device
        self._providers, self._threads = list(providers), threads  # for the optional encoder sessions
        self.dit = make_session(bundle.graph(DIT_FILE), providers, threads)
        self.vocoder = make_session(bundle.graph(VOCODER_FILE), providers, threads)
        # a graph may take fewer inputs than the interface offers (an unguided DiT has no whisper or
        # cfg_strength input: the exporter drops unused inputs), so each run feeds only what it takes
        self._inputs = {id(s): {i.name for i in s.get_inputs()} for s in (self.dit, self.vocoder)}
        self._check_interfaces()
        self.providers = self.dit.get_providers()
        self.fallback: str | None = None  # why an automatically chosen accelerator was given up (`open`)
        self.hop = int(bundle.manifest["audio"]["hop_length"])
        self.io_binding = self.providers[0] in GPU_PROVIDERS and device.type == "cuda"
        marker = bundle.manifest.get("student")
        self.student = StudentInfo.from_dict(marker) if marker else None  # dit.onnx: STUDENT_*DIT_INPUTS

    def _check_interfaces(self) -> None:
        """Each graph takes only inputs its family's interface feeds (a manifest whose `family` does
        not match its graph, e.g. "v2" on a V3 DiT, is refused here, not by a missing feed later)."""
        graphs = ((DIT_FILE, self.dit, FAMILY_INTERFACES[self.family]), (VOCODER_FILE, self.vocoder,
                                                                          (VOCODER_INPUTS,)))
        for name, session, interfaces in graphs:
            taken = self._inputs[id(session)]
            if not any(taken <= set(names) for names in interfaces):
                unfed = sorted(taken - set().union(*interfaces))
                raise UserError(f"bundle {self.bundle.path}: {name} takes inputs {', '.join(unfed)} that a "
                                f"{self.family} bundle does not feed (manifest family {self.family!r} does "
                                "not match the graph)")

    @classmethod
    def open(cls, path, device: str = "auto", pretrained=None, providers: str | Sequence[str] | None = None,
             threads: int | None = None) -> "OnnxBackend":
        """Verify the bundle, pick providers (see `choose_providers`) and start both sessions."""
        bundle = read_bundle(path)
        chosen = _providers_for(device, providers)
        on_gpu = chosen[0] in GPU_PROVIDERS and torch.cuda.is_available()
        automatic = device == "auto" and parse_providers(providers) is None
        failed = []
        while True:
            try:
                backend = cls(bundle, chosen, torch.device("cuda" if on_gpu else "cpu"), threads)
                break
            except UserError as err:  # an accelerator picked automatically that fails on these graphs:
                if not automatic or chosen == [CPU]:  # the next one (CPU last), and the voice line says so
                    raise
                failed.append(f"{short_name(chosen[0])} failed ({err})")
                chosen = chosen[1:]
                on_gpu = chosen[0] in GPU_PROVIDERS and torch.cuda.is_available()
        if failed:
            backend.fallback = f"{'; '.join(failed)}; running on {short_name(chosen[0])}"
        return backend

    # -- running a graph --

    def _run(self, session: ort.InferenceSession, feeds: dict[str, torch.Tensor], out_name: str,
             out_shape: tuple[int, ...]) -> torch.Tensor:
        feeds = {k: v for k, v in feeds.items() if k in self._inputs[id(session)]}
        if not self.io_binding:
            arrays = {k: v.detach().cpu().numpy() for k, v in feeds.items()}
            return torch.from_numpy(session.run([out_name], arrays)[0]).to(self.device)
        binding = session.io_binding()
        held = []  # keep contiguous copies alive until the run ends
        for name, value in feeds.items():
            value = value.detach().to(self.device).contiguous()
            held.append(value)
            binding.bind_input(name, "cuda", self.device.index or 0, TORCH_TO_NUMPY[value.dtype],
                               list(value.shape), value.data_ptr())
        out = torch.empty(out_shape, dtype=torch.float32, device=self.device)
        binding.bind_output(out_name, "cuda", self.device.index or 0, np.float32, list(out.shape),
                            out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch are ready
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out

    # -- the Backend protocol --

    def step_velocity(self, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, cond: Conditioning,
                      guidance: Guidance) -> torch.Tensor:
        if self.student is None:
            return self.guided_velocity(x, t, cond, guidance)
        if cond.mask is not None and not bool(cond.mask.all()):
            raise ValueError("the ONNX DiT has no frame mask input: pass unpadded items")
        b, n = x.shape[0], x.shape[1]
        feeds = {"x": x.float(), "t": _per_item(t, b), "dt": _per_item(dt, b),
                 "spk": self._speaker_feed(cond.spk),
                 "f0": cond.f0.float(), "rms": cond.rms.float(), "cvec": cond.cvec.float()}
        if cond.whisper is not None:  # V2 students (a V3 student's graph has no whisper input)
            feeds["whisper"] = cond.whisper.float()
        return self._run(self.dit, feeds, DIT_OUTPUT, (b, n, x.shape[2]))

    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                        guidance: Guidance) -> torch.Tensor:
        if self.student is not None:  # its graph has no guidance branches: the velocity at dt = 0
            return self.step_velocity(x, t, torch.zeros(()), cond, guidance)
        if cond.mask is not None and not bool(cond.mask.all()):
            raise ValueError("the ONNX DiT has no frame mask input: pass unpadded items")
        b, n = x.shape[0], x.shape[1]
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        feeds = {"x": x.float(), "t": t.expand(b) if t.numel() == 1 else t,
                 "spk": self._speaker_feed(cond.spk),
                 "f0": cond.f0.float(), "rms": cond.rms.float(), "cvec": cond.cvec.float()}
        # the family's strengths are graph inputs (`_run` feeds only the inputs the graph has); the
        # skip-layer pass is fixed in the graph
        family = family_named(self.family)
        if "cfg_skip_layers" in family.guidance:
            self._check_skip_layers(guidance)
        feeds.update({name: torch.tensor(float(getattr(guidance, name))) for name in family.guidance
                      if name != "cfg_skip_layers"})
        if cond.whisper is not None:
            feeds["whisper"] = cond.whisper.float()
        if "bad_cvec" in self._inputs[id(self.dit)]:
            feeds["bad_cvec"] = bad_cvec_of(cond).float()
        return self._run(self.dit, feeds, DIT_OUTPUT, (b, n, x.shape[2]))

    def _speaker_feed(self, spk: torch.Tensor) -> torch.Tensor:
        """The graph's `spk`: weights over all rows (format 2), or the index (format 1: no blends)."""
        if self.takes_speaker_weights:
            return speaker_weights(spk, self.num_speaker)
        if spk.is_floating_point():
            raise UserError(f"bundle {self.bundle.path} (format 1) takes one speaker index, not a blend: "
                            "export it again with `rtsvc export`")
        return spk.long()

    def _check_skip_layers(self, guidance: Guidance) -> None:
        """The skip-layer pass is fixed in the graph at export: other layers cannot be honoured."""
        if guidance.skip_cfg_strength <= CFG_EPS or guidance.cfg_skip_layers == self.skip_layers:
            return
        exported = f"skip layers {list(self.skip_layers)}" if self.skip_layers else "no skip-layer pass"
        wanted = list(guidance.cfg_skip_layers or [])
        raise UserError(f"bundle {self.bundle.path} was exported with {exported}; skip-layer guidance "
                        f"with layers {wanted} needs `rtsvc export --cfg-skip-layers` with those layers "
                        "(or the .ckpt on --backend torch)")

    def vocode(self, log_mel: torch.Tensor, f0: torch.Tensor, phase: torch.Tensor,
               noise: torch.Tensor) -> torch.Tensor:
        """log-mel [b, 128, n], F0 [b, n] Hz, source phase [b or 1, 9], noise [b, n*512, 9] -> audio."""
        b, n = f0.shape
        feeds = {"mel": log_mel.float(), "f0": f0.float(), "phase": phase.float(), "noise": noise.float()}
        return self._run(self.vocoder, feeds, VOCODER_OUTPUT, (b, n * self.hop))

    # -- feature encoders exported with --with-encoders --

    def feature_extractor(self, pretrained, f0: str, device: torch.device,
                          encoder_threads: int | None = None):
        """A FeatureExtractor running the bundle's ContentVec and Whisper graphs on this backend's
        providers, or None when the bundle has no encoder graphs. F0: `--f0 fcpe` runs the bundle's
        fcpe.onnx when it has one (older bundles: torchfcpe), RMVPE comes from `pretrained`.
        `encoder_threads`: the encoder sessions' threads (None: the backend's), or with F0 on the
        bundle's graph, that graph's."""
        threads = self._threads if encoder_threads is None else encoder_threads
        from rtsvc.features.extractor import FeatureExtractor
        from rtsvc.features.f0 import make_f0_extractor

        features = self.bundle.manifest["features"]
        family = family_named(self.family)
        uses_whisper, content_resize = family.uses_whisper, family.content_resize
        cvec_file = (features.get("contentvec") or {}).get("onnx")
        whisper_file = (features.get("whisper") or {}).get("onnx")
        preprocessor = (features.get("whisper") or {}).get("preprocessor")
        if not cvec_file or (uses_whisper and not (whisper_file and preprocessor)):
            return None
        fcpe_file = (features.get("fcpe") or {}).get("onnx")
        fcpe_net = None
        if f0 == "fcpe" and fcpe_file:
            # F0 on its graph is short (~10 ms a block on 2 cores): beside the encoders it is the one
            # that takes `encoder_threads`, and the encoders keep the backend's (measured)
            session = make_session(self.bundle.graph(fcpe_file), self._providers, threads)
            fcpe_net = OnnxFcpeNet(session, device)
            threads = self._threads
        whisper = None
        if uses_whisper:
            from transformers import WhisperFeatureExtractor

            extractor = WhisperFeatureExtractor.from_pretrained(str(self.bundle.file(preprocessor).parent))
            whisper = OnnxWhisperEncoder(make_session(self.bundle.graph(whisper_file), self._providers,
                                                      threads), extractor, device)
        return FeatureExtractor(
            OnnxContentVec(make_session(self.bundle.graph(cvec_file), self._providers, threads), device),
            whisper,
            make_f0_extractor(f0, rmvpe_path=pretrained.rmvpe if pretrained else None, device=device,
                              fcpe_net=fcpe_net),
            device,
            content_resize,
            family.encoder_sinc_width,
        )


class OnnxFcpeNet:
    """FCPE's network over fcpe.onnx: mel [b, t, 128] -> latent [b, t, 360] (torch tensors)."""

    def __init__(self, session: ort.InferenceSession, device: torch.device):
        self.session = session
        self.device = device

    def __call__(self, mel: torch.Tensor) -> torch.Tensor:
        latent = self.session.run(None, {"mel": mel.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(latent).to(self.device)


class OnnxContentVec:
    """`rtsvc.features.contentvec.ContentVec`'s interface (`hidden`, `encode`, `dim`) over contentvec.onnx."""

    def __init__(self, session: ort.InferenceSession, device: torch.device):
        self.session = session
        self.device = device
        self.dim = int(session.get_outputs()[0].shape[-1])

    def hidden(self, audio_16k) -> torch.Tensor:
        from rtsvc.features.contentvec import MIN_SAMPLES

        audio = np.asarray(audio_16k, dtype=np.float32).reshape(1, -1)
        if audio.shape[-1] < MIN_SAMPLES:
            audio = np.pad(audio, ((0, 0), (0, MIN_SAMPLES - audio.shape[-1])))
        return torch.from_numpy(self.session.run(None, {"audio": audio})[0][0]).to(self.device)

    def hidden_batch(self, audios: list) -> list[torch.Tensor]:
        """`hidden` of segments of one length in one run (the graph's batch axis is dynamic)."""
        from rtsvc.features.contentvec import MIN_SAMPLES

        audio = np.stack([np.asarray(a, dtype=np.float32).reshape(-1) for a in audios])
        if audio.shape[-1] < MIN_SAMPLES:
            audio = np.pad(audio, ((0, 0), (0, MIN_SAMPLES - audio.shape[-1])))
        out = torch.from_numpy(self.session.run(None, {"audio": audio})[0]).to(self.device)
        return list(out.unbind(0))

    def encode(self, audio_16k, n_frames: int, mode: str | None = None) -> torch.Tensor:
        from rtsvc.features.frames import resize_frames

        return resize_frames(self.hidden(audio_16k), n_frames, mode)


def _per_item(t, batch: int) -> torch.Tensor:
    """A time (scalar or [b]) as a float32 [b] tensor."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


def _whisper_method(name: str):
    """Borrow a method of `rtsvc.features.whisper.WhisperEncoder` (chunking, log-mel, resizing) so the
    ONNX encoder computes features exactly as the torch one around the network itself."""

    def method(self, *args, **kwargs):
        from rtsvc.features.whisper import WhisperEncoder

        return getattr(WhisperEncoder, name)(self, *args, **kwargs)

    method.__name__ = name
    return method


class OnnxWhisperEncoder:
    """`rtsvc.features.whisper.WhisperEncoder`'s interface over whisper_encoder.onnx, which holds
    the layers up to hidden_states[-2] (RIFT-SVC's feature)."""

    log_mel = _whisper_method("log_mel")
    hidden = _whisper_method("hidden")
    encode = _whisper_method("encode")

    def __init__(self, session: ort.InferenceSession, feature_extractor, device: torch.device):
        self.session = session
        self.feature_extractor = feature_extractor
        self.device = device
        self.dim = int(session.get_outputs()[0].shape[-1])

    def hidden_from_mel(self, mel: torch.Tensor, layer_index: int = -2,
                        position_offset: int | list[int] = 0) -> torch.Tensor:
        """As `WhisperEncoder.hidden_from_mel`. The graph takes one position offset per run, so a
        batch with per-item offsets runs once per distinct offset (streams of one server reach
        the same clamped offset after ~29 s; until then each offset is its own run)."""
        if layer_index != -2:
            raise ValueError("whisper_encoder.onnx was exported for hidden_states[-2] only")
        mel = mel.detach().float().cpu().numpy()
        if isinstance(position_offset, int):
            offsets = [position_offset] * mel.shape[0]
        else:
            offsets = [int(o) for o in position_offset]
        out = None
        for offset in dict.fromkeys(offsets):
            rows = [i for i, o in enumerate(offsets) if o == offset]
            feeds = {"mel": mel[rows], "position_offset": np.array(offset, dtype=np.int64)}
            part = self.session.run(None, feeds)[0]
            if out is None:
                out = np.empty((mel.shape[0], *part.shape[1:]), dtype=part.dtype)
            out[rows] = part
        return torch.from_numpy(out).to(self.device)

    def hidden_batch(self, audios: list, position_offsets: list[int]) -> list[torch.Tensor]:
        from rtsvc.features.whisper import hidden_batch

        return hidden_batch(self, audios, position_offsets)
