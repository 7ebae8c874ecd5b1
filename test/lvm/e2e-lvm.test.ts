/**
 * End to end on real LVM in one user-mode-linux guest (guest-pg-lab.ts):
 * a PostgreSQL 15 primary on a thin LV (agent db1: lvm-thin + thin-delta)
 * and its streaming standby on a plain LV under a dm-era target (agent db2:
 * lvm-classic + dm-era, quiesce = replay pause), both compiled agents in
 * the guest against the appliance in this process (10.0.2.2 from the
 * guest). Built once for the file: full images of both, then
 * - 1 000 pgbench transactions, audited incrementals of both (the audit
 *   checks the tracker's bitmap against a full digest comparison: 0 missed);
 * - 1 000 more, tracker incrementals reading only the marked chunks;
 * - instant mount of the primary's and of the standby's newest image on this
 *   host (another agent, the test-copy flow): PostgreSQL starts, the pgbench
 *   data is the backup's;
 * - kill -9 of db1 while its job holds a snapshot: the restarted agent
 *   removes its orphans and only its own;
 * - after the agents stop no job snapshot is left (the basis stays).
 * The two agents' jobs of a step run at once (as they would on two
 * machines): the guest works on one while the appliance stores the other's.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { applianceCmd } from '../../scripts/lab/processes.js';
import { e2eFixture, type E2eFixture } from '../support/e2e-fixture.js';
import { labSkipReason } from './guest-runner.js';
import { GuestPgLab, PRIMARY, STANDBY } from '../../scripts/lab/guest-pg-lab.js';

/**
 * The lab's size. Each whole-volume read in the slow guest (two full images,
 * two audits) takes time in proportion to the LVs: 128 MiB LVs and pgbench
 * scale 1 (100 000 accounts) instead of 256 MiB and scale 2. 1 MiB WAL
 * segments (the operator advice for LVM, README "Agent configuration"; a
 * 16 MiB segment's zero fill at each quiesce's switch was most of what an
 * incremental read) and min_wal_size = 16MB keep the WAL inside the smaller
 * LV. 1 000 transactions a step still change hundreds of 64 KiB chunks
 * (tables, indexes, WAL): the audit asserts at least 50.
 */
const LAB = { volumeMiB: 128, pgbenchScale: 1, initdbArgs: ['--wal-segsize=1'], pgConf: ['min_wal_size = 16MB'] };
const TRANSACTIONS = '1000';

type Stats = Record<string, unknown> & { changeSource: string; fallbackReason: string; auditMissed: number; audited: boolean; trackedChunks: number };

let fx: E2eFixture;
let appl: ApplianceHarness;
let lab: GuestPgLab;
/** "count sum" of pgbench_history after the last pgbench step: what the next images must hold. */
let history = '';
const newest: Record<string, string> = {};

async function job(who: { agent: string; volume: string }, mode: 'full' | 'incremental', audit = false) {
  const started = performance.now();
  const j = appl.app.router.startJob(who.agent, who.volume, mode, audit ? { audit: true } : {});
  const r = await j.done;
  if (!r.ok) throw new Error(`${who.agent} ${mode} failed: ${JSON.stringify(r)}\n${await lab.agentLogs()}`);
  newest[who.agent] = r.imageId!;
  return { id: j.id, stats: appl.app.catalog.job(j.id)!.stats as Stats, seconds: (performance.now() - started) / 1000 };
}

/**
 * Both agents' jobs at once (as they would run on two machines); waits for both before failing (no job left
 * running into the next step). For a while they ran one after the other: under load the standby then lost its
 * stream — the primary's backup-start checkpoint removed a 1 MiB segment the standby, stalled by its own
 * snapshot's freeze, had not received yet, and it never caught up ("requested WAL segment … has already been
 * removed", shown by the lab's step diagnostics). The lab's standby has a replication slot since.
 */
async function both(mode: 'full' | 'incremental', audit = false) {
  const r = await Promise.allSettled([job(PRIMARY, mode, audit), job(STANDBY, mode, audit)]);
  const failed = r.find((x) => x.status === 'rejected');
  if (failed) throw failed.reason;
  return r.map((x) => (x as PromiseFulfilledResult<Awaited<ReturnType<typeof job>>>).value);
}

beforeAll(async () => {
  fx = e2eFixture();
  if (labSkipReason) return;
  appl = await fx.appliance(['db1', 'db2', 'host'], { auditEvery: 0 });
  lab = await GuestPgLab.start({ appliance: appl, ...LAB });
  fx.defer('guest', () => lab.stop());
  const up = (a: string) => appl.app.router.connectedAgents().some((x) => x.agent === a);
  await lab.connected(() => up('db1') && up('db2'));
  await both('full');
}, 900_000);

afterAll(() => fx?.dispose(), 300_000);

describe.skipIf(labSkipReason)('LVM end to end: agents in the guest, appliance on the host', () => {
  it('after 1 000 pgbench transactions: audited thin-delta (primary) and dm-era (standby) incrementals, 0 missed chunks', async () => {
    history = (await lab.step('pgbench', TRANSACTIONS)).trim();
    const jobs = await both('incremental', true);
    for (const [i, [who, tracker]] of ([[PRIMARY, 'thin-delta'], [STANDBY, 'dm-era']] as const).entries()) {
      const { stats, seconds } = jobs[i]!;
      expect(stats.changeSource, JSON.stringify(stats)).toBe('digest-compare (audit)');
      expect(stats.fallbackReason, JSON.stringify(stats)).toBe('');
      expect(stats.audited).toBe(true);
      expect(stats.auditMissed).toBe(0);
      expect(stats.trackedChunks).toBeGreaterThan(0);
      // Enough really changed that a tracker missing some would show (1 018 / 792 with 2 000 transactions on 256 MiB).
      expect(Number(stats.auditChanged), JSON.stringify(stats)).toBeGreaterThanOrEqual(50);
      console.log(`${tracker} audit (${who.agent}): marked ${stats.trackedChunks} chunks, really changed ${String(stats.auditChanged)}, ` +
        `missed ${stats.auditMissed}; digest compare read ${String(stats.bytesRead)} bytes in ${seconds.toFixed(1)} s, frozen ${String(stats.freezeSeconds)} s`);
    }
  }, 900_000);

  it('after 1 000 more: tracker incrementals of both read only the chunks their tracker marked', async () => {
    history = (await lab.step('pgbench', TRANSACTIONS)).trim();
    const jobs = await both('incremental');
    for (const [i, [who, tracker]] of ([[PRIMARY, 'thin-delta'], [STANDBY, 'dm-era']] as const).entries()) {
      const { stats, seconds } = jobs[i]!;
      if (stats.changeSource !== 'tracker') console.log(`${JSON.stringify(stats)}\n${await lab.step('status', '')}\n${await lab.agentLogs()}`);
      expect(stats.changeSource, JSON.stringify(stats)).toBe('tracker');
      expect(stats.fallbackReason).toBe('');
      expect(Number(stats.chunksRead)).toBeLessThan(Number(stats.chunksTotal));
      console.log(`${tracker} incremental (${who.agent}): read ${String(stats.bytesRead)} bytes (${String(stats.chunksRead)} of ${String(stats.chunksTotal)} chunks) ` +
        `in ${seconds.toFixed(1)} s, frozen ${String(stats.freezeSeconds)} s`);
    }
  }, 900_000);

  it('instant mount on the host of the primary\'s and of the standby\'s image: PostgreSQL starts with the backup\'s pgbench data', async () => {
    expect(history).toMatch(/^\d+ -?\d+$/);
    const stateDir = await mkdtemp(path.join(os.tmpdir(), 'bsn-lvm-host-agent-'));
    fx.defer('host agent state', () => rm(stateDir, { recursive: true, force: true }));
    const host = await fx.agent({ url: appl.url, name: 'host', token: appl.tokens.host!, volumes: [], stateDir, tracking: 'off' });
    for (const who of [PRIMARY, STANDBY]) {
      const r = await applianceCmd(appl.dataDir, ['mount', newest[who.agent]!, '--on', 'host', '--json']);
      if (r.exitCode !== 0) {
        // Was the tracker image short of a write? An audited incremental now sees any chunk the last
        // tracker interval missed as changed-but-unmarked (auditMissed > 0).
        const audit = await job(who, 'incremental', true).then((x) => x.stats, (e: unknown) => String(e));
        console.log(`mount of ${who.agent}'s image failed; audited incremental after it: ${JSON.stringify(audit)}`);
      }
      // Whose image it was goes in the failure itself, with its PostgreSQL facts (label, LSNs, WAL files):
      // stop 18's CI output showed only PostgreSQL's refusal, not which of the two it was.
      const facts = r.exitCode === 0 ? '' : `\n${who.agent}'s image ${newest[who.agent]!}:\n${(await applianceCmd(appl.dataDir, ['images', 'show', newest[who.agent]!])).stdout}`;
      expect(r.exitCode, r.stderr + r.stdout + facts).toBe(0);
      const m = r.json as { mountId: string; connection: string; secondsToFirstQuery: number };
      fx.defer(`mount ${m.mountId}`, () => host.agent.mounts.unmount(m.mountId).catch(() => undefined));
      const kv = Object.fromEntries(m.connection.split(' ').map((p) => p.split('=') as [string, string]));
      const c = new pg.Client({ host: kv.host, port: Number(kv.port), user: kv.user, database: kv.dbname });
      await c.connect();
      try {
        const row = (await c.query<{ h: string; n: string }>("SELECT count(*) || ' ' || sum(delta) AS h, (SELECT count(*) FROM pgbench_accounts)::text AS n FROM pgbench_history")).rows[0]!;
        expect(row.h, `${who.agent}'s image`).toBe(history);
        expect(row.n).toBe(String(LAB.pgbenchScale * 100_000));
        // The primary streams to its standby through a slot: the copy must not keep it (prepare empties pg_replslot).
        const slots = (await c.query<{ n: string }>('SELECT count(*)::text AS n FROM pg_replication_slots')).rows[0]!.n;
        expect(slots, `${who.agent}'s copy keeps the source's replication slots`).toBe('0');
      } finally {
        await c.end();
      }
      console.log(`mount of ${who.agent}'s image on the host: first query after ${m.secondsToFirstQuery.toFixed(2)} s`);
      const un = await applianceCmd(appl.dataDir, ['mounts', 'remove', m.mountId]);
      expect(un.exitCode, un.stderr).toBe(0);
      await expect.poll(async () => (await host.agent.mounts.list()).length, { timeout: 120_000, interval: 300 }).toBe(0);
    }
  }, 600_000);

  it('kill -9 of the primary\'s agent during a job: restarted, it removes its orphan snapshots and only its own', async () => {
    const j = appl.app.router.startJob(PRIMARY.agent, PRIMARY.volume, 'incremental');
    const outcome = j.done.catch((e: unknown) => ({ ok: false, error: e }));
    const out = await lab.step('kill9', j.id);
    expect((await outcome).ok).toBe(false);
    const [killed, restarted] = out.split('--- restarted');
    expect(killed, out).toMatch(new RegExp(`bsn\\.job\\.${j.id}`));
    // db1's job snapshot is gone; the foreign agent's and the person's snapshots stay (removed by the guest after).
    expect(restarted, out).not.toMatch(/bsn\.job\.job-/);
    expect(restarted, out).toMatch(/other\.snap .*bsn\.agent\.other/);
    expect(restarted, out).toMatch(/manual\.snap/);
    // One thin-delta basis of the origin is kept, nothing else of db1's.
    expect(restarted!.match(/,bsn\.basis,/g)?.length, out).toBe(1);
  }, 600_000);

  it('the agents stop, the guest powers off: no job snapshot is left (the thin-delta basis stays)', async () => {
    const { result, lvs } = await lab.stop();
    expect(result?.code, result?.output).toBe(0);
    expect(lvs).toMatch(/pgdata/);
    expect(lvs).not.toMatch(/bsn\.job\./);
    expect(lvs.match(/,bsn\.basis,/g)?.length, lvs).toBe(1);
  }, 300_000);
});
