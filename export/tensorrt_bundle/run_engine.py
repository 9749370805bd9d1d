"""Run a kimi-compile TensorRT engine: explicit state, present.* fed back as past_key_values.*.

    python run_engine.py --bundle DIR [--engine model.plan] --prompt-ids 1,2,3 [--batch 1] [--max-new-tokens 16]

    from run_engine import TrtKimiRunner
    runner = TrtKimiRunner("bundle_dir")
    logits, state = runner(input_ids)          # first call: zero state, past_sequence_length 0
    logits, state = runner(next_ids, state)    # state = previous present.* under past_key_values.* names

Profile 0 (prefill) serves calls with more than one new token, profile 1 (decode) single-token calls.
Needs TensorRT >= 10.7 and torch with CUDA (device buffers).
"""

import argparse
import json
import os
import sys

PAST, PRESENT = "past_key_values.", "present."


def next_state(outputs):
    """present.{i}.<part> outputs -> the past_key_values.{i}.<part> inputs of the next call."""
    return {PAST + name[len(PRESENT):]: value for name, value in outputs.items() if name.startswith(PRESENT)}


def past_length(bundle, state):
    """Tokens already in the state: the past_sequence_length axis of the first input that has one (MLA
    caches), 0 for a first call or a model whose state has no such axis."""
    if state is None:
        return 0
    for inp in bundle["inputs"]:
        if "past_sequence_length" in inp["shape"] and inp["name"] in state:
            return int(state[inp["name"]].shape[inp["shape"].index("past_sequence_length")])
    return 0


def position_ids(past, batch, length):
    """position_ids of a call (rotary models such as Kimi K2): rows of past .. past + length - 1."""
    row = list(range(past, past + length))
    return [row for _ in range(batch)]


def zero_state_shapes(bundle, batch):
    """Shapes of a first call's state inputs (batch rows, past_sequence_length 0)."""
    sizes = {"batch_size": batch, "past_sequence_length": 0}
    return {inp["name"]: tuple(sizes[d] if isinstance(d, str) else d for d in inp["shape"])
            for inp in bundle["inputs"] if inp["name"].startswith(PAST)}


class TrtKimiRunner:
    def __init__(self, bundle_dir, engine_path=None, device=0):
        import tensorrt as trt
        import torch

        with open(os.path.join(bundle_dir, "bundle.json")) as f:
            self.bundle = json.load(f)
        sys.path.insert(0, os.path.join(bundle_dir, os.path.dirname(self.bundle["registration_module"])))
        __import__(os.path.splitext(os.path.basename(self.bundle["registration_module"]))[0])  # JIT plugins
        self.trt, self.torch = trt, torch
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        with open(engine_path or os.path.join(bundle_dir, "model.plan"), "rb") as f:
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(f.read())
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                        trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
        self.profile = None

    def dtype(self, name):
        return self._dtypes[self.engine.get_tensor_dtype(name)]

    def empty_state(self, batch):
        return {n: self.torch.zeros(s, dtype=self.dtype(n), device=self.device)
                for n, s in zero_state_shapes(self.bundle, batch).items()}

    def __call__(self, input_ids, state=None):
        torch = self.torch
        ids = torch.as_tensor(input_ids, dtype=torch.int64).to(self.device).contiguous()
        if state is None:
            state = self.empty_state(ids.shape[0])
        profile = 1 if ids.shape[1] == 1 and self.engine.num_optimization_profiles > 1 else 0
        if profile != self.profile:
            self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.profile = profile
        feeds = {"input_ids": ids}
        if "position_ids" in self.inputs:
            past = past_length(self.bundle, state)
            feeds["position_ids"] = torch.tensor(position_ids(past, ids.shape[0], ids.shape[1]), dtype=torch.int64,
                                                 device=self.device)
        feeds.update({n: state[n].contiguous() for n in self.inputs if n not in feeds})
        for name in self.inputs:
            self.context.set_input_shape(name, tuple(feeds[name].shape))
            self.context.set_tensor_address(name, feeds[name].data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self.dtype(name), device=self.device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return outs["logits"], next_state(outs)

    def generate(self, input_ids, max_new_tokens):
        # its own greedy loop, not kimi_compile.greedy: the bundle runs where kimi_compile is not installed
        torch = self.torch
        ids = torch.as_tensor(input_ids, dtype=torch.int64).to(self.device)
        logits, state = self(ids)
        out = [ids]
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits, state = self(nxt, state)
        return torch.cat(out, dim=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--engine", default=None)
    p.add_argument("--prompt-ids", default="1,2,3")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    import torch

    runner = TrtKimiRunner(args.bundle, args.engine)
    prompt = torch.tensor([[int(t) for t in args.prompt_ids.split(",")]] * args.batch)
    print(runner.generate(prompt, args.max_new_tokens).tolist())


if __name__ == "__main__":
    main()
