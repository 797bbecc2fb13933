"""A plain DeepSpeed training loop on a tensor-parallel model: ZeRO over the data-parallel ranks, tp_plugin
over the tensor-parallel ranks. The TP degree is the `"tensor_parallel": {"autotp_size": N}` key of the json.

CPU (gloo), 4 processes = TP 2 x DP 2:
    torchrun --nproc_per_node 4 examples/deepspeed_finetune.py --deepspeed_config configs/deepspeed/zero2_tp2.json
GPUs, with DeepSpeed's launcher (8 GPUs = TP 2 x DP 4):
    deepspeed --num_gpus 8 examples/deepspeed_finetune.py --deepspeed_config configs/deepspeed/zero3_tp2_bf16.json \
        --model /path/to/hf_checkpoint --save out/

Without --model it trains a small random Llama on the bytes of examples/data/corpus.txt, so it runs anywhere.
With --model DIR, each rank reads only its slices of the checkpoint (`tp_plugin.from_pretrained`).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import deepspeed
import torch
import torch.distributed as dist
import transformers

import tp_plugin

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CORPUS = pathlib.Path(__file__).resolve().parent / "data" / "corpus.txt"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an HF checkpoint directory (default: a small random Llama)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--save", help="write an ordinary HF checkpoint here at the end")
    parser.add_argument("--local_rank", type=int, default=-1)  # passed by the `deepspeed` launcher
    parser = deepspeed.add_config_arguments(parser)  # --deepspeed_config
    return parser.parse_args()


def build_model(path: str | None) -> torch.nn.Module:
    # tp_size is not given: parallelize / from_pretrained read it from --deepspeed_config
    if path:
        return tp_plugin.from_pretrained(path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                                      tie_word_embeddings=True)
    return tp_plugin.parallelize(transformers.LlamaForCausalLM(config))


def token_stream(model: torch.nn.Module, path: str | None) -> torch.Tensor:
    text = CORPUS.read_text()
    if path:
        return transformers.AutoTokenizer.from_pretrained(path)(text, return_tensors="pt").input_ids[0]
    return torch.tensor(list(text.encode()), dtype=torch.long)  # bytes: the random model's vocabulary is 256


def main() -> None:
    args = parse_args()
    deepspeed.init_distributed()  # NCCL on GPUs, gloo on CPU; tp_plugin uses the same process group
    model = build_model(args.model)
    mesh = model.tp_plugin_state.mesh
    tokens = token_stream(model, args.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)  # a torch optimizer: nothing to compile
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=args.deepspeed_config)

    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    gen = torch.Generator().manual_seed(1234)  # the same on every rank: each DP rank then takes its own rows
    rows = micro * mesh.dp_size
    if dist.get_rank() == 0:
        print(f"world {dist.get_world_size()} = TP {mesh.tp_size} x DP {mesh.dp_size}; ZeRO stage "
              f"{engine.zero_optimization_stage()}; micro batch {micro} x {gas} accumulation steps per DP rank")
    start = time.perf_counter()
    for step in range(args.steps):
        for _ in range(gas):
            starts = torch.randint(0, len(tokens) - args.seq - 1, (rows,), generator=gen)
            batch = torch.stack([tokens[s:s + args.seq] for s in starts[mesh.dp_rank * micro:(mesh.dp_rank + 1) * micro]])
            loss = engine(batch.to(engine.device), labels=batch.to(engine.device)).loss
            engine.backward(loss)
            engine.step()
        if dist.get_rank() == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  grad norm {engine.get_global_grad_norm():.3f}  "
                  f"{time.perf_counter() - start:.1f}s", flush=True)
    if args.save:
        tp_plugin.save_pretrained(engine, args.save)  # gathers ZeRO-3 partitions and TP shards, rank 0 writes
        if dist.get_rank() == 0:
            print(f"saved an ordinary HF checkpoint to {args.save}")
    engine.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
