// A Node.js client of `qbgw serve`, with nothing but Node's built-ins (global fetch, node:crypto, node:fs):
// what a JavaScript web app needs to submit a job with an image, long-poll it, read its result, and read a
// problem detail (RFC 9457) when a request is refused.
//
//   QBGW_URL=http://127.0.0.1:8080 QBGW_KEY=qbgw_... QBGW_ASSISTANT_ID=65d5... node client.mjs scan.png
//
// With QBGW_WEBHOOK_SECRET (whsec_...), it also asks for a webhook to a receiver of its own and verifies its
// signature with its own code (verifyWebhook).
//
// Prints one JSON line: {"job_id", "status", "answer", "problem_status", "problem_field", ...}. Exits 1 on
// any unexpected response, 2 on a usage error. The helpers are exported, so a script (or a later webhook
// receiver) can `import { request, submitJob, ... } from "./client.mjs"` without running main().

import { createHash, createHmac, randomUUID, timingSafeEqual } from "node:crypto";
import { readFileSync, realpathSync } from "node:fs";
import { createServer } from "node:http";
import { fileURLToPath } from "node:url";

/** The longest a job may take before the client gives up (seconds). */
export const JOB_DEADLINE = 120;
/** The long-poll of one status request (seconds; the server accepts at most 60). */
export const LONG_POLL = 30;

/** A response the client did not expect: its method, path, status and body, for the message and the exit. */
export class UnexpectedResponse extends Error {
  constructor(method, path, status, body, why) {
    super(`${method} ${path}: ${why} (HTTP ${status}): ${JSON.stringify(body).slice(0, 500)}`);
    this.name = "UnexpectedResponse";
    this.method = method;
    this.path = path;
    this.status = status;
    this.body = body;
  }
}

/** The settings from the environment: {url, key, assistantId}. Throws on a missing one. */
export function config(env = process.env) {
  const missing = ["QBGW_URL", "QBGW_KEY", "QBGW_ASSISTANT_ID"].filter((name) => !env[name]);
  if (missing.length) {
    throw new Error(`set ${missing.join(", ")} in the environment`);
  }
  return {
    url: env.QBGW_URL.replace(/\/+$/, ""),
    key: env.QBGW_KEY,
    assistantId: env.QBGW_ASSISTANT_ID,
    webhookSecret: env.QBGW_WEBHOOK_SECRET || null,
  };
}

/** A `data:image/png;base64,...` URI of a PNG file (its signature checked, so a wrong file fails here). */
export function pngDataUri(path) {
  const bytes = readFileSync(path);
  const signature = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  if (bytes.length < 8 || !bytes.subarray(0, 8).equals(signature)) {
    throw new Error(`${path} is not a PNG file`);
  }
  return { uri: `data:image/png;base64,${bytes.toString("base64")}`, bytes };
}

/** The body of a job: a text part and an image_url part. */
export function imageJob(assistantId, text, imageUri, customId) {
  return {
    assistant_id: assistantId,
    custom_id: customId,
    messages: [
      {
        role: "user",
        content: [
          { type: "text", text },
          { type: "image_url", image_url: { url: imageUri } },
        ],
      },
    ],
  };
}

/**
 * One request to the server with the key. Returns {status, headers, contentType, body}: the body parsed when
 * it is JSON (application/json or application/problem+json), else its text.
 */
export async function request(cfg, method, path, { json, headers = {}, signal } = {}) {
  const init = {
    method,
    headers: { Authorization: `Bearer ${cfg.key}`, Accept: "application/json", ...headers },
    signal,
  };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  const response = await fetch(cfg.url + path, init);
  const contentType = response.headers.get("content-type") || "";
  const text = await response.text();
  let body = text;
  if (/^application\/(problem\+)?json\b/.test(contentType)) {
    try {
      body = JSON.parse(text);
    } catch {
      throw new UnexpectedResponse(method, path, response.status, text, `${contentType} that is not JSON`);
    }
  }
  return { status: response.status, headers: response.headers, contentType, body };
}

/** `request`, then checks the status and that the body is a JSON object; returns the body. */
export async function expectJson(cfg, method, path, expectedStatus, options) {
  const answer = await request(cfg, method, path, options);
  if (answer.status !== expectedStatus) {
    throw new UnexpectedResponse(method, path, answer.status, answer.body, `expected HTTP ${expectedStatus}`);
  }
  if (!answer.contentType.startsWith("application/json") || typeof answer.body !== "object" || !answer.body) {
    throw new UnexpectedResponse(method, path, answer.status, answer.body, `expected a JSON object`);
  }
  return answer;
}

/** POST /v1/jobs: 202 with the job's id and a Location to poll. Returns the job's status body. */
export async function submitJob(cfg, job, { idempotencyKey = randomUUID() } = {}) {
  const path = "/v1/jobs";
  const answer = await expectJson(cfg, "POST", path, 202, { json: job, headers: { "Idempotency-Key": idempotencyKey } });
  const { id } = answer.body;
  if (typeof id !== "string" || !id) {
    throw new UnexpectedResponse("POST", path, answer.status, answer.body, "no job id");
  }
  if (answer.headers.get("location") !== `/v1/jobs/${id}`) {
    throw new UnexpectedResponse("POST", path, answer.status, answer.body, `Location ${answer.headers.get("location")}`);
  }
  return answer.body;
}

/** GET /v1/jobs/{id}?wait=... until `done` (or JOB_DEADLINE passes). Returns the last status and the polls made. */
export async function waitForJob(cfg, jobId, { deadline = JOB_DEADLINE, wait = LONG_POLL } = {}) {
  const until = Date.now() + deadline * 1000;
  const path = `/v1/jobs/${encodeURIComponent(jobId)}?wait=${wait}`;
  for (let polls = 1; ; polls += 1) {
    const { body } = await expectJson(cfg, "GET", path, 200);
    if (body.id !== jobId || typeof body.done !== "boolean") {
      throw new UnexpectedResponse("GET", path, 200, body, "not this job's status");
    }
    if (body.done) {
      return { status: body, polls };
    }
    if (Date.now() > until) {
      throw new UnexpectedResponse("GET", path, 200, body, `still ${body.status} after ${deadline} s`);
    }
  }
}

/** GET /v1/jobs/{id}/result: the answer (or error) of a job that has ended. */
export async function readResult(cfg, jobId) {
  const path = `/v1/jobs/${encodeURIComponent(jobId)}/result`;
  const { body } = await expectJson(cfg, "GET", path, 200);
  if (body.id !== jobId || !("answer" in body) || !("error" in body)) {
    throw new UnexpectedResponse("GET", path, 200, body, "not this job's result");
  }
  return body;
}

/**
 * A request the server must refuse with a problem detail: checks the status, the media type
 * (application/problem+json), `status` in the body, and that `errors[0].field` is a string. Returns the problem.
 */
export async function expectProblem(cfg, method, path, expectedStatus, options) {
  const answer = await request(cfg, method, path, options);
  const problem = answer.body;
  if (answer.status !== expectedStatus) {
    throw new UnexpectedResponse(method, path, answer.status, problem, `expected HTTP ${expectedStatus}`);
  }
  if (!answer.contentType.startsWith("application/problem+json")) {
    throw new UnexpectedResponse(method, path, answer.status, problem, `content-type ${answer.contentType}`);
  }
  if (typeof problem !== "object" || !problem || problem.status !== expectedStatus || typeof problem.type !== "string") {
    throw new UnexpectedResponse(method, path, answer.status, problem, "not a problem detail");
  }
  if (!Array.isArray(problem.errors) || !problem.errors.length || typeof problem.errors[0].field !== "string") {
    throw new UnexpectedResponse(method, path, answer.status, problem, "no errors[0].field");
  }
  return problem;
}

/**
 * Verify a Standard Webhooks signature with Node's own crypto: HMAC-SHA256 under the secret (base64 after
 * "whsec_") of `${webhook-id}.${webhook-timestamp}.${raw body}`, against any "v1,<base64>" of the
 * space-separated webhook-signature header; a timestamp more than `tolerance` seconds away is refused.
 */
export function verifyWebhook(secret, headers, rawBody, { tolerance = 300, now = Date.now() / 1000 } = {}) {
  const id = headers["webhook-id"];
  const timestamp = headers["webhook-timestamp"];
  const signatures = headers["webhook-signature"];
  if (!id || !timestamp || !signatures || !/^\d+$/.test(timestamp)) {
    return false;
  }
  if (Math.abs(now - Number(timestamp)) > tolerance) {
    return false;
  }
  const key = Buffer.from(secret.replace(/^whsec_/, ""), "base64");
  const expected = createHmac("sha256", key).update(`${id}.${timestamp}.`).update(rawBody).digest();
  return signatures.split(" ").some((part) => {
    const [version, signature] = part.split(",");
    const given = Buffer.from(signature || "", "base64");
    return version === "v1" && given.length === expected.length && timingSafeEqual(given, expected);
  });
}

/** A webhook receiver on 127.0.0.1 (a free port): resolves `received` with {headers, raw} of the first POST. */
export async function startReceiver() {
  let deliver;
  const received = new Promise((resolve) => {
    deliver = resolve;
  });
  const server = createServer((req, res) => {
    const chunks = [];
    req.on("data", (chunk) => chunks.push(chunk));
    req.on("end", () => {
      res.writeHead(204).end();
      deliver({ headers: req.headers, raw: Buffer.concat(chunks) });
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { url: `http://127.0.0.1:${server.address().port}/hook`, received, close: () => server.close() };
}

/** The whole round trip; returns what it saw (the JSON line main prints). */
export async function run(cfg, imagePath) {
  const { uri, bytes } = pngDataUri(imagePath);
  const customId = `node-${randomUUID()}`;
  const text = "Describe this image.";
  const receiver = cfg.webhookSecret ? await startReceiver() : null;
  const job = imageJob(cfg.assistantId, text, uri, customId);
  if (receiver) {
    job.webhook_url = receiver.url;
  }
  let submitted;
  try {
    submitted = await submitJob(cfg, job);
  } catch (error) {
    receiver?.close();
    throw error;
  }
  const { status, polls } = await waitForJob(cfg, submitted.id);
  const result = await readResult(cfg, submitted.id);
  if (result.status !== status.status || result.custom_id !== customId) {
    throw new UnexpectedResponse("GET", `/v1/jobs/${submitted.id}/result`, 200, result, "another status or custom_id");
  }
  // A bad request: messages missing. The server names the field in a problem detail.
  const problem = await expectProblem(cfg, "POST", "/v1/jobs", 422, { json: { assistant_id: cfg.assistantId } });
  const webhook = {};
  if (receiver) {
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error("no webhook within 60 s")), 60000);
    });
    let got;
    try {
      got = await Promise.race([receiver.received, timeout]);
    } finally {
      clearTimeout(timer);
      receiver.close();
    }
    const { headers, raw } = got;
    const event = JSON.parse(raw.toString("utf8"));
    const tampered = Buffer.from(raw.toString("utf8").replace(customId, "someone-else"));
    Object.assign(webhook, {
      webhook_verified: verifyWebhook(cfg.webhookSecret, headers, raw),
      webhook_tampered_verified: verifyWebhook(cfg.webhookSecret, headers, tampered),
      webhook_wrong_secret_verified: verifyWebhook(`whsec_${Buffer.alloc(24).toString("base64")}`, headers, raw),
      webhook_type: event.type,
      webhook_job_id: event.data.id,
      webhook_custom_id: event.data.custom_id,
    });
  }
  return {
    ...webhook,
    job_id: submitted.id,
    custom_id: customId,
    image_sha256: createHash("sha256").update(bytes).digest("hex"),
    polls,
    status: result.status,
    submitted_by: status.submitted_by,
    answer: result.answer,
    error: result.error,
    problem_status: problem.status,
    problem_type: problem.type,
    problem_field: problem.errors[0].field,
    problem_detail: problem.errors[0].detail,
  };
}

export async function main(argv = process.argv.slice(2), env = process.env) {
  let cfg;
  try {
    if (argv.length !== 1) {
      throw new Error("usage: node client.mjs <image.png>");
    }
    cfg = config(env);
  } catch (error) {
    console.error(error.message);
    return 2;
  }
  try {
    console.log(JSON.stringify(await run(cfg, argv[0])));
    return 0;
  } catch (error) {
    console.error(error instanceof UnexpectedResponse ? error.message : error.stack || String(error));
    return 1;
  }
}

// Run only as a script: importing this module (for its helpers) runs nothing.
if (process.argv[1] && realpathSync(process.argv[1]) === fileURLToPath(import.meta.url)) {
  process.exitCode = await main();
}
