// Drives the web chat page in headless Chromium: loads it, attaches an image,
// asks a question, waits for the streamed answer, saves a screenshot.
// Usage: node chat.mjs URL IMAGE SCREENSHOT   (run by tests/browser.rs)
import { chromium } from "playwright-core";

const [url, image, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"],
});
try {
  const page = await browser.newPage();
  // CI machines are slow and shared: generous timeouts, never a timed assertion.
  page.setDefaultTimeout(180000);
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById("model-name").textContent !== "…");
  const model = await page.textContent("#model-name");
  const modalities = await page.textContent("#modalities");
  await page.setInputFiles("#file", image);
  await page.waitForSelector(".chip");
  await page.fill("#prompt", "What is in this picture?");
  await page.click("#send");
  // Streaming: the assistant bubble fills chunk by chunk (counted in
  // data-chunks); a short answer may be done before `streaming` is ever seen.
  await page.waitForSelector(".msg.assistant.done", { state: "attached", timeout: 180000 });
  const failed = await page.$(".msg.assistant.error");
  const answer = await page.textContent(".msg.assistant .text");
  const chunks = Number(await page.getAttribute(".msg.assistant", "data-chunks"));
  await page.screenshot({ path: screenshot, fullPage: true });
  const images = await page.$$eval(".msg.user img", (imgs) => imgs.length);
  console.log(JSON.stringify({ model, modalities, answer, chunks, error: failed !== null, images }));
} finally {
  await browser.close();
}
