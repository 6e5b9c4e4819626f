// The official `openai` npm package against qbgw serve's OpenAI-compatible endpoints, as a team's own code
// would use it: only base_url and the key change. Prints one JSON object of what it saw, for
// tests/e2e/test_openai_node.py to check; exits 1 on anything unexpected.
//
//   QBGW_URL, QBGW_KEY (a submitter), QBGW_OTHER_KEY (another submitter), QBGW_ASSISTANT_ID
//   node client.mjs BATCH.jsonl SLOW.jsonl IMAGE.png
import fs from "node:fs";
import OpenAI, { toFile } from "openai";

const [batchPath, slowPath, imagePath] = process.argv.slice(2);
const baseURL = `${process.env.QBGW_URL}/v1`;
const client = new OpenAI({ apiKey: process.env.QBGW_KEY, baseURL, maxRetries: 0, timeout: 120_000 });
const other = new OpenAI({ apiKey: process.env.QBGW_OTHER_KEY, baseURL, maxRetries: 0, timeout: 120_000 });
const model = process.env.QBGW_ASSISTANT_ID;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function poll(id, wanted, seconds) {
  const deadline = Date.now() + seconds * 1000;
  for (;;) {
    const batch = await client.batches.retrieve(id);
    if (wanted.includes(batch.status)) return batch;
    if (Date.now() > deadline) throw new Error(`batch ${id} still ${batch.status} after ${seconds}s`);
    await sleep(500);
  }
}

async function linesOf(fileId) {
  if (!fileId) return [];
  const response = await client.files.content(fileId);
  const text = await response.text();
  return text.split("\n").filter((line) => line.trim()).map((line) => JSON.parse(line));
}

async function refusal(promise) {
  try {
    await promise;
    return null;
  } catch (error) {
    if (!(error instanceof OpenAI.APIError)) throw error;
    return { status: error.status, param: error.param ?? null, code: error.code ?? null, type: error.type ?? null };
  }
}

const seen = {};

// A batch of 200 lines, from upload to its output and error files.
const uploaded = await client.files.create({
  file: await toFile(fs.createReadStream(batchPath), "notes.jsonl"),
  purpose: "batch",
});
seen.file = { id: uploaded.id, bytes: uploaded.bytes, purpose: uploaded.purpose, filename: uploaded.filename };
const batch = await client.batches.create({
  input_file_id: uploaded.id,
  endpoint: "/v1/chat/completions",
  completion_window: "24h",
  metadata: { from: "node" },
});
const done = await poll(batch.id, ["completed", "failed", "expired", "cancelled"], 240);
seen.batch = { id: done.id, status: done.status, counts: done.request_counts, metadata: done.metadata };
seen.output = await linesOf(done.output_file_id);
seen.errors = await linesOf(done.error_file_id);

// Another key's view of the file: it does not exist.
seen.other_retrieve = await refusal(other.files.retrieve(uploaded.id));
seen.other_content = await refusal(other.files.content(uploaded.id));
seen.other_list = (await other.files.list()).data.map((file) => file.id);

// A batch cancelled midway.
const slow = await client.files.create({ file: await toFile(fs.createReadStream(slowPath), "slow.jsonl"), purpose: "batch" });
const slowBatch = await client.batches.create({
  input_file_id: slow.id,
  endpoint: "/v1/chat/completions",
  completion_window: "24h",
});
await poll(slowBatch.id, ["in_progress"], 60);
await sleep(1500);
const cancelling = await client.batches.cancel(slowBatch.id);
const cancelled = await poll(slowBatch.id, ["cancelled"], 120);
seen.cancel = {
  first_status: cancelling.status,
  status: cancelled.status,
  counts: cancelled.request_counts,
  errors: await linesOf(cancelled.error_file_id),
  output: await linesOf(cancelled.output_file_id),
};

// A chat completion with an image, and the job behind it in a header.
const image = `data:image/png;base64,${fs.readFileSync(imagePath).toString("base64")}`;
const { data: completion, response } = await client.chat.completions
  .create({
    model,
    messages: [
      {
        role: "user",
        content: [
          { type: "text", text: "Describe this scan." },
          { type: "image_url", image_url: { url: image } },
        ],
      },
    ],
  })
  .withResponse();
seen.chat = {
  object: completion.object,
  model: completion.model,
  answer: completion.choices[0].message.content,
  job_id: response.headers.get("x-qbgw-job-id"),
};

// Parameters the gateway cannot honour are refused by name.
seen.refused_temperature = await refusal(
  client.chat.completions.create({ model, messages: [{ role: "user", content: "hi" }], temperature: 0.2 }),
);
seen.refused_stream = await refusal(
  client.chat.completions.create({ model, messages: [{ role: "user", content: "hi" }], stream: true }),
);

process.stdout.write(JSON.stringify(seen) + "\n");
