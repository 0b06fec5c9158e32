"""`petalnode generate`: stream a continuation of a prompt."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from petalnode.cli._swarm_key import add_swarm_key_option, swarm_key_from_args
from petalnode.errors import ConfigError


def add_generate_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("generate", help="generate text from a prompt, streaming tokens as they come")
    parser.add_argument("prompt", help="the text to continue (or the user message, with --chat)")
    parser.add_argument("--model", default=None, help="local model directory or id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=None, help="sample with this temperature")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling")
    parser.add_argument("--top-k", type=int, default=None, help="top-k sampling")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    parser.add_argument("--bootstrap", action="append", default=[], metavar="ADDR",
                        help="a swarm peer (repeatable); without it, a local swarm is started for this run")
    parser.add_argument("--servers", type=int, default=3, help="local swarm: number of server processes")
    parser.add_argument("--in-process", action="store_true",
                        help="run the blocks in this process instead of a swarm (debugging)")
    parser.add_argument("--codec", default="raw", choices=["raw", "fp16", "bf16", "int8"],
                        help="how hidden states travel between peers (default raw: lossless)")
    parser.add_argument("--wait-for-blocks", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for servers when some blocks have none (default 60)")
    parser.add_argument("--step-timeout", type=float, default=None, metavar="SECONDS",
                        help="how long one server may take for one step before the client fails over "
                             "(default: Timeouts.step, 60)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--verify", choices=["off", "sample", "full"], default=None,
                        help="re-check servers' outputs on other servers: sample (default with --bootstrap: every "
                             "position is checked before the answer is final, a streamed token may be retracted), "
                             "full (every step before it is used), off (default for the local swarm: your own "
                             "processes)")
    add_swarm_key_option(parser)
    parser.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:  # before importing torch: a typo is answered at once
        raise ConfigError("--max-new-tokens must be at least 1")
    if args.swarm_key is not None and not args.bootstrap:
        raise ConfigError("--swarm-key joins a private swarm: give its --bootstrap address too")
    swarm_key = swarm_key_from_args(args)

    from petalnode import DEFAULT_TIMEOUTS
    from petalnode.client import AutoDistributedModelForCausalLM, even_spans
    from petalnode.codecs import TensorCodec
    from petalnode.compute import configure_threads, load_model_info
    from petalnode.node import RemoteBlockChain

    configure_threads(args.threads)
    info = load_model_info(args.model)
    tokenizer, input_ids = _encode_prompt(info, args)  # before any swarm starts: prompt errors fail fast
    with contextlib.ExitStack() as stack:
        if args.in_process:
            print(f"petalnode: running {info.source.name} ({info.num_blocks} blocks) in this process",
                  file=sys.stderr, flush=True)
            model = AutoDistributedModelForCausalLM.from_pretrained(
                info.source, spans=even_spans(info.num_blocks, args.servers)
            )
        else:
            bootstrap = args.bootstrap
            if not bootstrap:
                bootstrap = [_start_local_swarm(stack, args, info)]
            # The swarm client dials tcp:// and webrtc:// (servers behind NAT, through their relay).
            timeouts = DEFAULT_TIMEOUTS.replace(wait_for_blocks=args.wait_for_blocks)
            if args.step_timeout is not None:
                timeouts = timeouts.replace(step=args.step_timeout)
            verify = args.verify or ("sample" if args.bootstrap else "off")
            chain = RemoteBlockChain.connect(info, bootstrap=bootstrap, codec=TensorCodec(args.codec),
                                             timeouts=timeouts, swarm_key=swarm_key, verify=verify)
            stack.callback(chain.close)
            model = AutoDistributedModelForCausalLM.from_pretrained(info.source, chain=chain)
        return _generate(model, tokenizer, input_ids, args)


def _start_local_swarm(stack: contextlib.ExitStack, args: argparse.Namespace, info) -> str:
    from petalnode.client import even_spans
    from petalnode.node import LocalSwarm

    spans = even_spans(info.num_blocks, args.servers)
    print(f"petalnode: no --bootstrap given: starting a local swarm of {info.source.name}: a bootstrap and "
          f"{len(spans)} servers (blocks {', '.join(f'{a}-{b - 1}' for a, b in spans)}) on 127.0.0.1 ...",
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    model = str(info.source.path) if args.model else None
    swarm = stack.enter_context(LocalSwarm(model, spans=spans, threads=args.threads))
    print(f"petalnode: local swarm ready in {time.perf_counter() - started:.1f} s "
          f"(bootstrap {swarm.bootstrap_address})", file=sys.stderr, flush=True)
    return swarm.bootstrap_address


def _encode_prompt(info, args: argparse.Namespace):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(info.source.path)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"model {info.source.name} has no chat template; drop --chat")
        input_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    return tokenizer, input_ids


def _generate(model, tokenizer, input_ids, args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    sampling = any(v is not None for v in (args.temperature, args.top_p, args.top_k))
    options: dict = {"max_new_tokens": args.max_new_tokens, "do_sample": sampling}
    if sampling:
        if args.seed is not None:
            torch.manual_seed(args.seed)
        options.update(
            {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p), ("top_k", args.top_k))
             if v is not None}
        )
    else:
        # Greedy: clear sampling defaults a model's generation_config may carry, so nothing warns or samples.
        options.update(temperature=None, top_p=None, top_k=None)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    started = time.perf_counter()
    with model.inference_session(max_length=input_ids.shape[1] + args.max_new_tokens):
        # The session is open (every route found, caches reserved) before the prompt is echoed, so a failure
        # to find servers does not leave half a line on the terminal.
        if not args.chat:
            print(args.prompt, end="", flush=True)
        output = model.generate(input_ids, streamer=streamer, pad_token_id=tokenizer.eos_token_id, **options)
    elapsed = time.perf_counter() - started
    new_tokens = output.shape[1] - input_ids.shape[1]
    print(f"petalnode: {new_tokens} tokens in {elapsed:.1f} s ({new_tokens / elapsed:.1f} tokens/s)",
          file=sys.stderr)
    return 0
