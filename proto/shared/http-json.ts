import type { IncomingMessage } from 'node:http';
import { BlocksnapError } from '../errors.js';

/**
 * The JSON object body of a control-socket request (agent and appliance),
 * bounded: a local CLI never sends more than a few hundred bytes.
 */
export async function readJsonBody(req: IncomingMessage, maxBytes = 64 * 1024): Promise<Record<string, unknown>> {
  const parts: Buffer[] = [];
  let size = 0;
  for await (const c of req) {
    size += (c as Buffer).length;
    if (size > maxBytes) throw new BlocksnapError('E_USAGE', 'request body too large');
    parts.push(c as Buffer);
  }
  try {
    const v = JSON.parse(Buffer.concat(parts).toString('utf8') || '{}');
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not an object');
    return v;
  } catch (e) {
    throw new BlocksnapError('E_USAGE', 'request body is not a JSON object', { cause: e });
  }
}
