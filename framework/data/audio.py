"""Audio clips (the shards ``pretrain shards audio`` writes) -> waveforms at one sample rate.

The loader decodes each clip (soundfile: WAV, FLAC), mixes it down to mono, resamples it to
``data.sample_rate`` with soxr (``data.resample=false`` makes a clip at another rate a bad sample
instead), leaves out clips shorter than ``data.min_seconds`` (counted: ``data/filtered_samples``),
crops training clips longer than ``data.max_seconds`` at a random offset (seeded, resumable;
aligned to the encoder's frame stride so frame targets stay aligned), and normalises each clip to
zero mean and unit variance. Batches are padded to their longest clip, with the lengths beside
them; with ``data.bucket`` each batch holds clips of similar duration (see ShardStream's bucket).
A clip that does not decode, is empty, or is at the wrong rate is a bad sample under
``data.on_error``, named with its shard and key.
"""
from __future__ import annotations

import io
import json
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from framework.config.schema import DataConfig
from framework.data.images import key_id, sample_label
from framework.data.loader import ShardDataMixin, train_loader, val_loader
from framework.data.tar import Sample
from framework.errors import ConfigError, SampleError, SampleFiltered
from framework.models.audio_encoder import frame_lengths, receptive_field

AUDIO_EXTS = ("flac", "wav")


def audio_member(sample: Sample) -> Optional[bytes]:
    for ext in AUDIO_EXTS:
        if ext in sample:
            return sample[ext]
    return None


def decode_audio(data: bytes, sample_rate: int, resample: bool = True) -> np.ndarray:
    """Encoded WAV/FLAC bytes -> float32 mono waveform at ``sample_rate``; SampleError saying why not."""
    import soundfile

    from framework.data.writers.audio import read_audio_info

    try:  # the header against the bytes: libsndfile reads a cut WAV without complaint
        read_audio_info(data)
    except ValueError as exc:
        raise SampleError(f"audio does not decode: {exc}") from None
    try:
        wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile's errors, RuntimeError, EOFError on cut files
        raise SampleError(f"audio does not decode: {str(exc).split(': ', 1)[-1]}") from None
    if wave.shape[0] == 0:
        raise SampleError("empty clip (0 samples)")
    mono = wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]
    if rate != sample_rate:
        if not resample:
            raise SampleError(f"sample rate {rate} Hz, data.sample_rate is {sample_rate} Hz and data.resample is false")
        import soxr

        mono = soxr.resample(mono, rate, sample_rate, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)


def clip_seconds(sample: Sample) -> float:
    """A raw clip's duration without decoding it: the writer's json, else the bytes' length."""
    if "json" in sample:
        try:
            return float(json.loads(str(sample["json"], "utf-8"))["duration"])
        except (ValueError, KeyError, TypeError):
            pass
    data = audio_member(sample)
    return len(data) / 32000.0 if data is not None else 0.0  # ~16 kHz 16-bit: only an ordering


class AudioDecoder:
    """The loader's processor: a clip -> [(waveform, samples)] (train), with its frame
    ``targets`` when a HuBERT target index is given, or [(waveform, samples, label, key id)]."""

    one_to_one = True

    def __init__(self, data: DataConfig, seed: int, crop: bool, with_labels: bool = False,
                 targets: Any = None, conv_layers: Optional[List[List[int]]] = None) -> None:
        if data.sample_rate < 1 or data.max_seconds <= 0 or data.min_seconds < 0:
            raise ConfigError("data.sample_rate must be >= 1, data.max_seconds > 0 and data.min_seconds >= 0")
        self.rate, self.resample, self.seed = data.sample_rate, data.resample, seed
        self.max_samples = int(data.max_seconds * data.sample_rate)
        self.min_samples = int(data.min_seconds * data.sample_rate)
        self.crop, self.with_labels, self.targets, self.conv_layers = crop, with_labels, targets, conv_layers or []
        self.stride = receptive_field(self.conv_layers)[1] if conv_layers else 1
        self.draws = 0  # crops drawn so far: with the seed, the state of the crop offsets

    def __call__(self, key: str, sample: Sample, shard: str) -> List[Any]:
        data = audio_member(sample)
        if data is None:
            raise SampleError(f"no audio member (.{', .'.join(AUDIO_EXTS)}) in {sorted(sample)}")
        wave = decode_audio(bytes(data), self.rate, self.resample)
        if len(wave) < max(self.min_samples, 1):
            raise SampleFiltered(f"{len(wave) / self.rate:.2f} s < data.min_seconds")
        start = 0
        if len(wave) > self.max_samples:
            if self.crop:  # at a multiple of the frame stride: frame targets stay aligned
                self.draws += 1
                starts = (len(wave) - self.max_samples) // self.stride + 1
                start = int(np.random.default_rng([self.seed, self.draws]).integers(starts)) * self.stride
            wave = wave[start : start + self.max_samples]
        wave = (wave - wave.mean()) / (wave.std() + 1e-7)
        item: tuple = (wave.astype(np.float32), len(wave))
        if self.targets is not None:
            count = int(frame_lengths(torch.tensor([len(wave)]), self.conv_layers)[0])
            if self.crop or self.targets.covers(shard):  # training needs every clip's targets
                frames = self.targets.frames(key, start // self.stride, count)
            else:  # a validation set the targets were not written for: probe features, no loss
                frames = np.zeros(0, dtype=np.int64)
            item += (frames,)
        if self.with_labels:
            item += (sample_label(sample), key_id(key))
        return [item]

    def state_dict(self) -> Dict[str, Any]:
        return {"draws": self.draws}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.draws = int(state["draws"])


def collate_audio(items: List[Any]) -> Dict[str, torch.Tensor]:
    """Waveforms padded with zeros to the longest, their lengths; targets padded with -1."""
    columns = list(zip(*items))
    lengths = torch.tensor(columns[1], dtype=torch.long)
    wave = torch.zeros(len(items), int(lengths.max()))
    for row, clip in enumerate(columns[0]):
        wave[row, : len(clip)] = torch.from_numpy(clip)
    batch = {"wave": wave, "length": lengths}
    rest = columns[2:]
    if rest and isinstance(rest[0][0], np.ndarray):  # frame targets
        longest = max(len(t) for t in rest[0])
        targets = torch.full((len(items), longest), -1, dtype=torch.long)
        for row, frames in enumerate(rest[0]):
            targets[row, : len(frames)] = torch.from_numpy(frames.astype(np.int64))
        batch["targets"] = targets
        rest = rest[1:]
    if rest:
        batch["label"] = torch.tensor(rest[0], dtype=torch.long)
        batch["id"] = torch.tensor(rest[1], dtype=torch.long)
    return batch


class AudioDataModule(ShardDataMixin, LightningDataModule):
    """Train: an endless stream of padded clip batches (similar lengths with ``data.bucket``);
    val: one labelled pass (for the online probes), clips cut to ``data.max_seconds``."""

    row_modality = "audio"

    def __init__(self, data: DataConfig, seed: int, conv_layers: Optional[List[List[int]]] = None,
                 targets: Any = None) -> None:
        super().__init__()
        self.data, self.seed, self.conv_layers, self.targets = data, seed, conv_layers, targets
        self.resolve_data(data)

    def processor(self) -> AudioDecoder:
        return AudioDecoder(self.data, self.seed, crop=True, targets=self.targets, conv_layers=self.conv_layers)

    def train_dataloader(self):
        rank, world = self._rank_world()
        bucket = clip_seconds if self.data.bucket and self.data.shuffle_buffer >= self.data.batch_size > 1 else None
        return train_loader(
            self.train_shards, self.processor(), self.data, seed=self.seed, rank=rank, world_size=world,
            collate_fn=collate_audio, sources=self.sources, bucket=bucket,
        )

    def val_dataloader(self):
        rank, world = self._rank_world()
        return self.val_loaders(lambda shards: val_loader(
            shards, AudioDecoder(self.data, self.seed, crop=False, with_labels=True, conv_layers=self.conv_layers,
                                 targets=self.targets),
            self.data, seed=self.seed, rank=rank, world_size=world, collate_fn=collate_audio,
        ))
