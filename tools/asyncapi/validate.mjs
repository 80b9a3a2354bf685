// Parse an AsyncAPI document (stdin) with @asyncapi/parser: every diagnostic on stdout as one JSON
// line; exit 1 when any is an error (severity 0), 0 otherwise.
import { Parser } from '@asyncapi/parser';

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const parser = new Parser();
const { document, diagnostics } = await parser.parse(Buffer.concat(chunks).toString('utf8'));
for (const d of diagnostics) {
  console.log(JSON.stringify({ severity: d.severity, code: d.code, message: d.message, path: d.path }));
}
const errors = diagnostics.filter((d) => d.severity === 0);
if (!document || errors.length) process.exit(1);
console.log(JSON.stringify({ messages: document.messages().all().map((m) => m.name()) }));
