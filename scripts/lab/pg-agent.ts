import { mkdir } from 'node:fs/promises';
import type { Logger } from 'pino';
import type { Agent } from '../../agent/agent.js';
import { composeAgent } from '../../agent/compose.js';
import { parseAgentConfig } from '../../agent/config.js';
import { ReflinkSnapshotProvider } from '../../agent/snapshot/reflink-snapshot-provider.js';
import { RetainingSnapshotProvider } from '../../agent/snapshot/retaining-provider.js';
import type { SnapshotProvider, VolumeSpec } from '../../agent/snapshot/snapshot-provider.js';

/**
 * Test helper: an in-process agent with reflink volumes, connected to the
 * appliance at `url`. `postgres` is the raw config section (parseAgentConfig
 * checks it and fills defaults); `retainDir` keeps a reflink clone of every
 * snapshot there (to compare exports with). Stopped again if it does not
 * connect; the caller stops it otherwise.
 */
export interface TestAgentOptions {
  url: string;
  name: string;
  token: string;
  volumes: VolumeSpec[];
  stateDir: string;
  postgres?: Record<string, unknown>;
  tracking?: 'tracefs' | 'off';
  retainDir?: string;
  /** Further raw config fields (groups, caFile, …). */
  extra?: Record<string, unknown>;
  log: Logger;
}

export interface TestAgent {
  agent: Agent;
  /** The provider the agent uses: a RetainingSnapshotProvider when `retainDir` was given. */
  provider: SnapshotProvider;
}

export async function startTestAgent(o: TestAgentOptions): Promise<TestAgent> {
  await mkdir(o.stateDir, { recursive: true });
  const config = parseAgentConfig({
    appliance: o.url, agent: o.name, token: o.token, stateDir: o.stateDir, volumes: o.volumes,
    tracking: o.tracking ?? 'tracefs', ...(o.postgres ? { postgres: o.postgres } : {}), ...o.extra,
  });
  const reflink = new ReflinkSnapshotProvider({ stateDir: o.stateDir, logger: o.log, volumes: o.volumes });
  const provider = o.retainDir ? new RetainingSnapshotProvider(reflink, o.retainDir) : reflink;
  const agent = await composeAgent(config, o.log, { ports: { provider } });
  try {
    await agent.start();
    await agent.waitConnected(15_000);
  } catch (e) {
    await agent.stop().catch(() => undefined);
    throw e;
  }
  return { agent, provider };
}

/** One volume and a `postgres` section: the common case of the PostgreSQL tests. */
export interface PgAgentOptions extends Omit<TestAgentOptions, 'volumes' | 'postgres'> {
  volume: VolumeSpec;
  postgres: Record<string, unknown>;
}

export async function startPgAgent(o: PgAgentOptions): Promise<Agent> {
  const { volume, ...rest } = o;
  return (await startTestAgent({ ...rest, volumes: [volume] })).agent;
}
