// Judges device ids with OpenPanel's own sanitizeOverrideDeviceId, read from its source text
// (apps/api/src/controllers/track.controller.ts) at run time: none of its code is committed.
//   node device_ids.mjs path/to/track.controller.ts cases.json > verdicts.json
// Each case {"value": ...} gets "kept": the device id the server takes, or null (ignored).
import { readFileSync } from 'node:fs';

const source = readFileSync(process.argv[2], 'utf8');
const constant = source.match(/const MAX_OVERRIDE_DEVICE_ID_LENGTH = \d+;/)[0];
const body = source
  .match(/function sanitizeOverrideDeviceId\(raw: unknown\): string \| undefined \{[\s\S]*?\n\}/)[0]
  .replace('(raw: unknown): string | undefined', '(raw)'); // the only TypeScript in it
const sanitize = new Function(`${constant}\n${body}\nreturn sanitizeOverrideDeviceId;`)();
const cases = JSON.parse(readFileSync(process.argv[3], 'utf8'));
console.log(JSON.stringify(cases.map((c) => ({ ...c, kept: sanitize(c.value) ?? null })), null, 1));
