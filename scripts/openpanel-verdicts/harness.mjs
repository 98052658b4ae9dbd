// Runs OpenPanel's POST /track body pipeline (fastify 5.8.5 JSON parsing + fastify-zod-openapi
// validator with zTrackHandlerPayload from commit ed7bddd) on each case body; prints verdicts.
import Fastify from 'fastify';
import { validatorCompiler, serializerCompiler } from 'fastify-zod-openapi';
import { z } from 'zod';
import { readFileSync, writeFileSync } from 'node:fs';
import { zTrackHandlerPayload } from './schema.mjs';

const cases = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const fastify = Fastify({ bodyLimit: 1_048_576 * 500, logger: false });
fastify.setValidatorCompiler(validatorCompiler);
fastify.setSerializerCompiler(serializerCompiler);
fastify.route({
  method: 'POST', url: '/track',
  schema: { body: zTrackHandlerPayload.and(z.object({ clientId: z.string().optional(), clientSecret: z.string().optional() })) },
  handler: async () => ({ ok: true }),
});
await fastify.ready();
const out = [];
for (const c of cases) {
  const res = await fastify.inject({ method: 'POST', url: '/track', payload: c.body, headers: { 'content-type': 'application/json' } });
  let message = '';
  if (res.statusCode !== 200) { try { message = JSON.parse(res.body).message; } catch { message = res.body; } }
  out.push({ ...c, status: res.statusCode, message });
}
writeFileSync(process.argv[3], JSON.stringify(out, null, 1));
console.log(out.length, 'cases;', out.filter(o => o.status === 200).length, 'accepted');
