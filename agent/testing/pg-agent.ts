import { mkdir } from 'node:fs/promises';
import type { Logger } from 'pino';
import { Agent } from '../agent.js';
import { parseAgentConfig } from '../config.js';
import { ReflinkSnapshotProvider } from '../snapshot/reflink-snapshot-provider.js';
import type { VolumeSpec } from '../snapshot/snapshot-provider.js';

/**
 * Test helper: an in-process agent with one reflink volume and a
 * `postgres` section (raw, as in the JSON config: parseAgentConfig checks it
 * and fills the defaults), connected to the appliance at `url`. Stopped
 * again if it does not connect; the caller stops it otherwise.
 */
export interface PgAgentOptions {
  url: string;
  name: string;
  token: string;
  volume: VolumeSpec;
  stateDir: string;
  postgres: Record<string, unknown>;
  tracking?: 'tracefs' | 'off';
  log: Logger;
}

export async function startPgAgent(o: PgAgentOptions): Promise<Agent> {
  await mkdir(o.stateDir, { recursive: true });
  const config = parseAgentConfig({
    appliance: o.url, agent: o.name, token: o.token, stateDir: o.stateDir, volumes: [o.volume],
    tracking: o.tracking ?? 'tracefs', postgres: o.postgres,
  });
  const agent = new Agent(config, new ReflinkSnapshotProvider({ stateDir: o.stateDir, logger: o.log, volumes: [o.volume] }), o.log);
  try {
    await agent.start();
    await agent.waitConnected(15_000);
  } catch (e) {
    await agent.stop().catch(() => undefined);
    throw e;
  }
  return agent;
}
