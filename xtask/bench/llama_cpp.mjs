// llama.cpp's side of `cargo xtask bench lm --llama-cpp`: the same GGUF file, the same
// prompt ids, the same thread count, through node-llama-cpp (npm; its prebuilt
// llama.cpp libraries, the CPU variant for this machine picked at load, so nothing
// is compiled). xtask installs it into target/bench/llama-cpp-node on first use.
//
//     node xtask/bench/llama_cpp.mjs --gguf PATH --prompt-ids FILE.json --decode 128 --threads N
//
// Prefill is one evaluation of the whole prompt (batch size = the prompt length, so
// llama.cpp takes it in one batch as `llama-bench -p` does) up to the first greedy
// token; decode is one evaluation per new token through the KV cache, greedy
// (temperature 0), EOS ignored. The best of `--repeat` runs is reported, after one
// warm-up, with the sequence's history cleared between runs. Prints one JSON object
// on the last stdout line.

import { readFileSync } from "node:fs";
import { basename, join } from "node:path";
import { pathToFileURL } from "node:url";

function parseArgs(argv) {
  const args = { decode: 128, threads: 1, repeat: 2, module: "node-llama-cpp" };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "").replace(/-/g, "_");
    args[key] = argv[i + 1];
  }
  for (const key of ["decode", "threads", "repeat"]) args[key] = Number(args[key]);
  if (!args.gguf || !args.prompt_ids) throw new Error("--gguf and --prompt-ids are required");
  return args;
}

function peakRssBytes() {
  const status = readFileSync("/proc/self/status", "utf8");
  const line = status.split("\n").find((l) => l.startsWith("VmHWM:"));
  return line ? Number(line.split(/\s+/)[1]) * 1024 : null;
}

const args = parseArgs(process.argv.slice(2));
// `--module DIR/node_modules/node-llama-cpp`: where xtask installed it.
const manifest = JSON.parse(readFileSync(join(args.module, "package.json"), "utf8"));
const entry = join(args.module, manifest.exports?.["."]?.import ?? manifest.exports?.["."]?.default ?? manifest.main ?? "index.js");
const { getLlama, LlamaLogLevel } = await import(pathToFileURL(entry).href);
const version = manifest.version;
const ids = JSON.parse(readFileSync(args.prompt_ids, "utf8"));

let t0 = performance.now();
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath: args.gguf });
const context = await model.createContext({
  contextSize: ids.length + args.decode + 8,
  batchSize: Math.max(ids.length, 1),
  threads: args.threads,
  sequences: 1,
});
const sequence = context.getSequence();
const loadS = (performance.now() - t0) / 1000;

async function run(prompt, decode) {
  await sequence.clearHistory();
  const tokens = sequence.evaluate(prompt, { temperature: 0 });
  t0 = performance.now();
  const first = await tokens.next();
  const prefillS = (performance.now() - t0) / 1000;
  const out = [first.value];
  t0 = performance.now();
  for (let i = 0; i < decode; i++) {
    const next = await tokens.next();
    if (next.done) throw new Error(`generation ended after ${out.length} tokens`);
    out.push(next.value);
  }
  const decodeS = (performance.now() - t0) / 1000;
  await tokens.return();
  return [prefillS, decodeS, out];
}

await run(ids.slice(0, 16), 4);
let prefill = 0;
let decodeRate = 0;
let first = null;
for (let i = 0; i < args.repeat; i++) {
  const [p, d, out] = await run(ids, args.decode);
  first = first ?? out;
  prefill = Math.max(prefill, ids.length / p);
  decodeRate = Math.max(decodeRate, args.decode / d);
}
const quant = basename(args.gguf).split(".").slice(-2, -1)[0].toLowerCase();
console.log(
  JSON.stringify({
    impl: `llama.cpp ${quant}`,
    version: `node-llama-cpp ${version}`,
    threads: args.threads,
    load_s: loadS,
    prompt_tokens: ids.length,
    decode_tokens: args.decode,
    prefill_tok_s: prefill,
    decode_tok_s: decodeRate,
    first_ids: first.slice(0, 16),
    peak_rss_bytes: peakRssBytes(),
  }),
);
await context.dispose();
await model.dispose();
await llama.dispose();
