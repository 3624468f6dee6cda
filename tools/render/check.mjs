// Render Mermaid files and HTML pages in headless Chromium; report errors; keep screenshots.
//
// Used by tests/test_render_browser.py. One Chromium for all jobs (start-up is the
// expensive part). Usage:
//
//   node tools/render/check.mjs JOBS.json
//
// JOBS.json: {"chromium": "/usr/bin/chromium", "out": "artifacts/render",
//             "jobs": [{"name": "bootstrap", "kind": "mermaid", "input": "diagrams/bootstrap.mmd"},
//                      {"name": "report", "kind": "html", "input": "x.html", "expect": "#diagram svg"}]}
//
// Prints one JSON line: [{"name", "ok", "errors": [...], "screenshot", "ms", "info"}].
// A job fails on: a Mermaid parse/render error, an uncaught page error, a console
// error, any network request (the pages must work offline), or a missing/empty
// expected element. Exit code 0 whatever the jobs' results (the test judges them);
// non-zero only if this script itself could not run.

import { readFileSync, mkdirSync } from "node:fs";
import { createRequire } from "node:module";
import { resolve, join } from "node:path";
import { pathToFileURL } from "node:url";
import { chromium } from "playwright-core";

const require = createRequire(import.meta.url);
const MERMAID_JS = require.resolve("mermaid/dist/mermaid.min.js");
const MERMAID_VERSION = require("mermaid/package.json").version;

const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
mkdirSync(spec.out, { recursive: true });

const browser = await chromium.launch({
  executablePath: spec.chromium,
  headless: true,
  timeout: 30000,
  // Background networking is off: this machine's network is closed, and the pages
  // under test must not need it anyway.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"],
});

// Errors go to the job that is running; pages are watched from the moment they open.
let errors = [];
async function openPage() {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(15000);
  page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") errors.push(`console: ${m.text()}`); });
  page.on("request", (r) => {
    const url = r.url();
    if (!/^(file|data|about|blob):/.test(url)) errors.push(`network request: ${url}`);
  });
  return { context, page };
}

// One page holds mermaid.js for every Mermaid job: loading the 3 MB bundle is most of
// a job's cost. Each job replaces the previous drawing.
let mermaidPage = null;
async function getMermaidPage() {
  if (mermaidPage === null) {
    mermaidPage = await openPage();
    await mermaidPage.page.setContent(
      "<!DOCTYPE html><html><body style='margin:8px'><div id='out'></div></body></html>");
    await mermaidPage.page.addScriptTag({ path: MERMAID_JS });
    await mermaidPage.page.evaluate(() =>
      // securityLevel strict: labels are text, as on GitHub.
      window.mermaid.initialize({ startOnLoad: false, securityLevel: "strict" }));
  }
  return mermaidPage;
}

async function runJob(job, n) {
  const started = Date.now();
  errors = [];
  const own = job.kind === "mermaid" ? null : await openPage();
  const page = own ? own.page : (await getMermaidPage()).page;
  let info = {};
  try {
    if (job.kind === "mermaid") {
      const text = job.text ?? readFileSync(job.input, "utf8");
      info = await page.evaluate(async ([src, id]) => {
        document.getElementById("out").innerHTML = "";
        try {
          await window.mermaid.parse(src);
          const { svg } = await window.mermaid.render(id, src);
          document.getElementById("out").innerHTML = svg;
        } catch (e) {
          return { renderError: String(e && e.message ? e.message : e) };
        }
        const el = document.querySelector("#out svg");
        const box = el.getBoundingClientRect();
        return {
          nodes: el.querySelectorAll("g.node, g.stateGroup, [id*='state-']").length,
          edges: el.querySelectorAll("path.transition, .transition").length,
          width: Math.round(box.width), height: Math.round(box.height),
          errorText: /Syntax error|Parse error/i.test(el.textContent || ""),
        };
      }, [text, `diagram${n}`]);
      info.mermaid = MERMAID_VERSION;
      if (info.renderError) errors.push(`mermaid: ${info.renderError}`);
      else {
        if (info.errorText) errors.push("mermaid drew its error picture");
        if (!info.nodes) errors.push("mermaid drew no states");
        if (!info.width || !info.height) errors.push("mermaid drew an empty svg");
      }
    } else if (job.kind === "html") {
      await page.goto(pathToFileURL(resolve(job.input)).href, { waitUntil: "load" });
      info = await page.evaluate((sel) => {
        const el = document.querySelector(sel);
        if (!el) return { missing: sel };
        const box = el.getBoundingClientRect();
        return { title: document.title, width: Math.round(box.width),
                 height: Math.round(box.height),
                 verdict: document.body.dataset.verdict ?? null };
      }, job.expect ?? "body");
      if (info.missing) errors.push(`no element matches ${info.missing}`);
      else if (!info.width || !info.height) errors.push(`${job.expect} is empty`);
    } else {
      errors.push(`unknown job kind ${job.kind}`);
    }
    const shot = join(spec.out, `${job.name}.png`);
    await page.screenshot({ path: shot, fullPage: true });
    info.screenshot = shot;
  } catch (e) {
    errors.push(`driver: ${e && e.message ? e.message : e}`);
  } finally {
    if (own) await own.context.close();
  }
  return { name: job.name, ok: errors.length === 0, errors, info, ms: Date.now() - started };
}

const results = [];
try {
  for (const [n, job] of spec.jobs.entries()) results.push(await runJob(job, n));
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(results) + "\n");
