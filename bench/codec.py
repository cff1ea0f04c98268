"""Codec speed: encode + decode of 64 MiB of fp16 tensors against a plain copy of the same bytes.

    python -m bench.codec [--quick]

Goal: the codec's throughput is at least 0.5x the copy's (decode is zero-copy, so encode's one
copy into a new frame is most of the cost). The baseline copies the same bytes into a new bytes
object, which is what any encoder producing one frame must at least do.
"""

from __future__ import annotations

import numpy as np

from bench.common import best_of, figure, parser
from npcbus.codec import decode, encode
from npcbus.messages import Delta


def main() -> None:
    args = parser(__doc__).parse_args()
    total_mib = 16 if args.quick else 64
    repeat = 3 if args.quick else 7
    rng = np.random.default_rng(0)
    n_tensors = 32
    per = total_mib * 1024 * 1024 // 2 // n_tensors
    tensors = {f"base_model.layers.{i}.lora_A.weight": rng.standard_normal(per, dtype=np.float32).astype(np.float16)
               for i in range(n_tensors)}
    msg = Delta("bench", "t", "npc", 0, "w", 1, tensors=tensors)
    flat = np.concatenate([t.view(np.uint8) for t in tensors.values()])

    def codec_round_trip():
        out = decode(encode(msg))
        # touch every tensor so that a lazy decode cannot cheat
        for t in out.tensors.values():
            _ = t[-1]

    def plain_copy():
        # a copy into a new buffer, as encode must make (a fresh bytes object, like the frame)
        _ = bytes(memoryview(flat))

    codec_round_trip()
    plain_copy()
    t_codec = best_of(codec_round_trip, repeat)
    t_copy = best_of(plain_copy, repeat)
    mib = flat.nbytes / 2**20
    print(f"# {mib:.0f} MiB of fp16: codec encode+decode {mib / t_codec:.0f} MiB/s, plain copy {mib / t_copy:.0f} MiB/s")
    figure("codec.throughput_vs_copy", mib / t_codec, mib / t_copy, ">=0.5", unit="MiB/s")


if __name__ == "__main__":
    main()
