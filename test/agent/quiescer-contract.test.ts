/**
 * The Quiescer contract (quiescer.contract.ts) against PgQuiescer on a real
 * PostgreSQL 15 primary and streaming standby, and against the fake.
 */
import { chmod, mkdtemp, realpath, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { PgQuiescer } from '../../agent/pg/pg-quiescer.js';
import { FakeDatabase, FakeQuiescer } from '../../agent/pg/testing/fake-quiescer.js';
import { findPgServers } from '../../scripts/lab/version-lab.js';
import { PgCluster } from '../../scripts/lab/pg-cluster.js';
import { createStreamingStandby, currentLsn, replayPauseState, waitReplayed } from '../../scripts/lab/pg-standby.js';
import { quiescerContract, type QuiescerRig } from './quiescer.contract.js';

quiescerContract('fake', async () => {
  const db = new FakeDatabase('primary');
  return { role: 'primary', make: (o) => new FakeQuiescer(db, o), held: async () => db.held.size > 0, teardown: async () => {} };
});

quiescerContract('fake standby', async () => {
  const db = new FakeDatabase('standby');
  return { role: 'standby', make: (o) => new FakeQuiescer(db, o), held: async () => db.held.size > 0, teardown: async () => {} };
});

const pg15 = (await findPgServers()).find((b) => b.major === '15');
if (!pg15) throw new Error('PostgreSQL 15 is part of the lab (/usr/lib/postgresql/15/bin)');
let seq = 0;

/** A PostgreSQL 15 primary, and its streaming standby when `standby`. Releases what it made, also when a step fails. */
async function pgRig(standby: boolean): Promise<QuiescerRig> {
  const undo: Array<() => Promise<unknown>> = [];
  const teardown = async () => {
    for (const f of undo.reverse()) await f().catch(() => undefined);
  };
  try {
    const root = await realpath(await mkdtemp(path.join(os.tmpdir(), 'blocksnap-qcontract-')));
    undo.push(() => rm(root, { recursive: true, force: true }));
    await chmod(root, 0o755);
    const primary = new PgCluster({ dataDir: path.join(root, 'primary'), binDir: pg15!.binDir });
    undo.push(() => primary.destroy());
    await primary.initdb();
    await primary.start();
    let server = primary;
    if (standby) {
      server = await createStreamingStandby({ primary, build: pg15!, dataDir: path.join(root, 'standby'), applicationName: `qcontract${process.pid}` });
      undo.push(() => server.destroy());
      await waitReplayed(server, await currentLsn(primary));
    }
    const app = `bsq-contract-${process.pid}-${standby ? 's' : 'p'}`;
    return {
      role: standby ? 'standby' : 'primary',
      make: (o) => new PgQuiescer({
        connection: { ...server.connectionConfig(), application_name: `${app}-${seq++}` }, role: o?.role ?? 'auto',
        watchdogSeconds: o?.watchdogSeconds,
      }),
      // A session backup lives as long as its session and is the session's last statement while held;
      // on a standby, the replay pause is the hold.
      held: async () => {
        if (standby && (await replayPauseState(server, pg15!.versionNum)) !== 'not paused') return true;
        const rows = await server.query<{ n: string }>(
          "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name LIKE $1 AND query ILIKE '%pg_backup_start%'", [`${app}-%`]);
        return Number(rows[0]!.n) > 0;
      },
      teardown,
    };
  } catch (e) {
    await teardown();
    throw e;
  }
}

quiescerContract('PgQuiescer, PostgreSQL 15 primary', () => pgRig(false));
quiescerContract('PgQuiescer, PostgreSQL 15 standby', () => pgRig(true));
