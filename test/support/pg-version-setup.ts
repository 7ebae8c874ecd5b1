import { join } from 'node:path';
import type { Agent } from '../../agent/agent.js';
import type { PgServerBuild } from '../../scripts/lab/version-lab.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import type { PgCluster } from '../../scripts/lab/pg-cluster.js';
import { createStreamingStandby, currentLsn, waitReplayed } from '../../scripts/lab/pg-standby.js';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import type { E2eFixture } from './e2e-fixture.js';
import { TICK_TABLE_SQL } from './pg-ticker.js';
import { waitFor } from './wait-for.js';

export interface PgVersionSetUp {
  lab: VolumeLab;
  primary: PgCluster;
  /** Only for role 'standby': the streaming standby on the volume. */
  standby?: PgCluster;
  /** The cluster the agent backs up (the one on the volume). */
  backedUp: PgCluster;
  agent: Agent;
}

export interface PgVersionOptions {
  build: PgServerBuild;
  appl: ApplianceHarness;
  /** Agent name (registered with `appl`). */
  agent: string;
  /** 'primary': the primary lives on the volume; 'standby': the primary in the lab root, its standby on the volume. */
  role: 'primary' | 'standby';
  poolSize?: number;
  /** Run on the primary after the tick table, before any standby is made (so the standby has them too). */
  primarySql?: string[];
  standbySettings?: Record<string, string>;
  /** Further `postgres` config fields of the agent. */
  postgres?: Record<string, unknown>;
}

const MiB = 1024 * 1024;

/**
 * The per-version set-up the PostgreSQL matrix tests share (pg-matrix,
 * pg-standby-matrix, pg-standby): a volume lab, a primary of `build` with
 * the tick table, for role 'standby' a streaming standby of it on the volume
 * (replayed up to the primary's position), and an in-process agent for the
 * cluster on the volume. Everything is registered with `fx`, so one
 * `fx.dispose()` releases it in reverse order, also after a failed step.
 */
export async function setUpPgVersion(fx: E2eFixture, o: PgVersionOptions): Promise<PgVersionSetUp> {
  const lab = await fx.lab({ volumeSize: 256 * MiB, poolSize: o.poolSize ?? 2048 * MiB, name: 'pgdata' });
  const primaryDir = o.role === 'primary' ? join(lab.volumeMount, 'pg') : join(lab.root, 'primary');
  const primary = await fx.pg({ dataDir: primaryDir, binDir: o.build.binDir });
  await primary.query(TICK_TABLE_SQL);
  for (const sql of o.primarySql ?? []) await primary.query(sql);
  let standby: PgCluster | undefined;
  if (o.role === 'standby') {
    standby = fx.add('standby', await createStreamingStandby({
      primary, build: o.build, dataDir: join(lab.volumeMount, 'pg'), applicationName: o.agent, settings: o.standbySettings,
    }), (s) => s.destroy());
    await waitReplayed(standby, await currentLsn(primary));
  }
  const backedUp = standby ?? primary;
  const agent = await fx.pgAgent({
    url: o.appl.url, name: o.agent, token: o.appl.tokens[o.agent]!, volume: lab.volume, stateDir: join(lab.root, 'agent-state'),
    postgres: { host: '127.0.0.1', port: backedUp.port, user: 'postgres', role: o.role, ...o.postgres },
  });
  return { lab, primary, standby, backedUp, agent };
}

/**
 * blocksnap sessions on a server once the backends of closed ones have
 * exited (a backend outlives its client's close by a moment): waits up to
 * 3 s for none, then returns how many are left.
 */
export async function blocksnapSessions(c: PgCluster): Promise<number> {
  const count = async () => Number((await c.query<{ n: string }>("SELECT count(*)::text AS n FROM pg_stat_activity WHERE application_name LIKE 'blocksnap%'"))[0]!.n);
  await waitFor('blocksnap sessions to end', async () => (await count()) === 0, { timeoutMs: 3000, everyMs: 50 }).catch(() => undefined);
  return count();
}
