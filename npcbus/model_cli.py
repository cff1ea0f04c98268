"""``npcbus model init [DIR]``: build the offline default model (tokenizer + small Llama, pre-trained,
fine-tuned on NPC turns) and one LoRA adapter per shipped persona.

Needs no network. Reuses an existing build in DIR when its stamp matches the asked parameters
(seed, steps, builder version, corpus hash); ``--force`` rebuilds anyway. DIR defaults to
``MODEL_DIR`` and the seed to ``MODEL_SEED``.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", nargs="?", default=None, metavar="DIR",
                        help="where to write the model (default: MODEL_DIR, .npcbus/models/default)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the build (default: MODEL_SEED, 1234)")
    parser.add_argument("--steps", type=int, default=None,
                        help="pre-training steps (default: the default model's)")
    parser.add_argument("--sft-steps", type=int, default=None,
                        help="fine-tuning steps on NPC turns (default: the default model's; 0: none)")
    parser.add_argument("--persona-steps", type=int, default=None,
                        help="training steps of each persona adapter (default: the default model's; 0: none)")
    parser.add_argument("--hidden-size", type=int, default=None,
                        help="model width (default 256); heads of 64 (vLLM's CPU attention needs head size >= 64)")
    parser.add_argument("--layers", type=int, default=None, help="transformer layers (default 2)")
    parser.add_argument("--prompt-style", choices=("minimal", "compact", "full"), default=None,
                        help="how NPC requests become prompts for the model (default: the default model's)")
    parser.add_argument("--sft-batch-size", type=int, default=None, help="fine-tuning batch size")
    parser.add_argument("--response-order", choices=("plan_first", "dialogue_first"), default=None,
                        help="the order the model writes a response's keys in (default plan_first: intent and "
                             "actions, then the line)")
    parser.add_argument("--force", action="store_true", help="rebuild even if DIR holds a matching build")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from npcbus.logs import setup_logging
    from npcbus.settings import BusSettings, ModelSettings, SettingsError

    try:
        bus = BusSettings.from_env()
        setup_logging(bus.log_format, bus.log_level)
        ms = ModelSettings.from_env()
    except SettingsError as e:
        print(f"npcbus model init: {e}")
        return 2
    if any(v is not None and v < 0 for v in (args.steps, args.sft_steps, args.persona_steps)):
        print("npcbus model init: --steps, --sft-steps and --persona-steps must be >= 0")
        return 2
    if args.hidden_size is not None and (args.hidden_size < 64 or args.hidden_size % 64):
        print("npcbus model init: --hidden-size must be a multiple of 64 (heads of 64)")
        return 2
    if any(v is not None and v < 1 for v in (args.layers, args.sft_batch_size)):
        print("npcbus model init: --layers and --sft-batch-size must be >= 1")
        return 2

    from npcbus import model as M

    out = Path(args.dir if args.dir is not None else ms.model_dir).expanduser().resolve()
    params = {"seed": args.seed if args.seed is not None else ms.model_seed}
    for arg, name in (("steps", "train_steps"), ("sft_steps", "sft_steps"), ("persona_steps", "persona_steps"),
                      ("layers", "num_layers"), ("sft_batch_size", "sft_batch_size"),
                      ("prompt_style", "prompt_style"), ("response_order", "response_order")):
        if getattr(args, arg) is not None:
            params[name] = getattr(args, arg)
    if args.hidden_size is not None:
        # heads of 64; the feed-forward width in the default's proportion (688 for 256), a multiple of 16
        heads = args.hidden_size // 64
        params.update(hidden_size=args.hidden_size, num_heads=heads, num_kv_heads=heads,
                      intermediate_size=16 * round(args.hidden_size * 688 / 256 / 16))
    reused = not args.force and M.is_current(out, **params)
    if not reused:
        print(f"building the default model in {out} (seed {params['seed']}) ...", flush=True)
    try:
        M.ensure_default_model(out, force=args.force, **params)
    except (FileExistsError, ValueError) as e:
        print(f"npcbus model init: {e}")
        return 2
    stamp = M.read_stamp(out) or {}
    p = stamp.get("params", {})
    print(("reused the existing build in " if reused else "wrote ") + str(out))
    print(f"  parameters:  {stamp.get('n_params', 0):,} (Llama: hidden {p.get('hidden_size')}, "
          f"{p.get('num_layers')} layers, {p.get('num_heads')} heads of {p.get('hidden_size', 0) // max(1, p.get('num_heads', 1))})")
    print(f"  vocabulary:  {stamp.get('vocab_size')} (tokenizer {stamp.get('tokenizer_size')} tokens, byte-level BPE)")
    print(f"  pre-training: {p.get('train_steps')} steps of {p.get('batch_size')}x{p.get('seq_len')} tokens "
          f"over a {stamp.get('stream_tokens')}-token corpus stream, final loss {stamp.get('final_loss')}")
    sft = stamp.get("sft") or {}
    if sft:
        print(f"  fine-tuning: {sft.get('steps')} steps of {p.get('sft_batch_size')} NPC turns ({sft.get('records')} "
              f"turns, {stamp.get('prompt_style')} prompts), final loss {sft.get('final_loss')}")
    personas = stamp.get("personas") or {}
    if personas:
        print(f"  persona adapters: {', '.join(personas)} ({p.get('persona_steps')} steps each) in {out}/personas/")
    print(f"  seed {stamp.get('seed')}, built in {stamp.get('build_seconds')} s, weights sha256 {str(stamp.get('weights_sha256'))[:16]}")
    return 0
