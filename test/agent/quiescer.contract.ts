import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { PgRole, Quiescer } from '../../agent/pg/quiescer.js';
import { codeOf } from '../support/error-code.js';

/**
 * The Quiescer contract (agent/pg/quiescer.ts), written once and run against
 * every implementation: PgQuiescer on a real PostgreSQL primary and standby,
 * and the fake (quiescer-contract.test.ts). A rig is one database server and
 * a way to look at it from outside the quiescer.
 */
export interface QuiescerRig {
  /** What the server is. */
  role: PgRole;
  /** A new, unconnected quiescer of the server. */
  make(o?: { role?: PgRole | 'auto'; watchdogSeconds?: number }): Quiescer;
  /**
   * Whether a quiescer still holds the server, seen from outside: a backup or
   * its session on a primary, the replay pause on a standby.
   */
  held(): Promise<boolean>;
  teardown(): Promise<void>;
}


async function until(what: string, ms: number, fn: () => Promise<boolean>): Promise<void> {
  const end = Date.now() + ms;
  while (!(await fn())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** Held state once a release has had time to reach the server (a backend exits asynchronously). */
async function releasedOn(rig: QuiescerRig): Promise<boolean> {
  await until('the hold to end', 5000, async () => !(await rig.held())).catch(() => undefined);
  return !(await rig.held());
}

export function quiescerContract(name: string, makeRig: () => Promise<QuiescerRig>): void {
  describe(`Quiescer contract: ${name}`, () => {
    let rig: QuiescerRig;
    const open: Quiescer[] = [];
    const make = (o?: Parameters<QuiescerRig['make']>[0]) => {
      const q = rig.make(o);
      open.push(q);
      return q;
    };

    beforeAll(async () => {
      rig = await makeRig();
    }, 120_000);
    afterEach(async () => {
      for (const q of open.splice(0)) await q.close();
    });
    afterAll(async () => {
      await rig?.teardown();
    });

    it('connect says what the server is, and says it again while the session is healthy', async () => {
      const q = make();
      const a = await q.connect();
      expect(a.role).toBe(rig.role);
      expect(a.version).toBeGreaterThan(0);
      expect(await q.connect()).toEqual(a);
      expect(await rig.held()).toBe(false);
    });

    it('a server that is not the configured role is refused E_PG, holding nothing', async () => {
      const q = make({ role: rig.role === 'primary' ? 'standby' : 'primary' });
      expect(await codeOf(q.connect())).toBe('E_PG');
      expect(await codeOf(q.quiesce({ label: 'never' }))).toBe('E_USAGE');
      expect(await releasedOn(rig)).toBe(true);
    });

    it('quiesce before connect, and a label that is not 1–200 printable ASCII, are E_USAGE with nothing held', async () => {
      const q = make();
      expect(await codeOf(q.quiesce({ label: 'early' }))).toBe('E_USAGE');
      await q.connect();
      for (const label of ['', 'x'.repeat(201), 'tab\there', 'naïve']) {
        expect(await codeOf(q.quiesce({ label })), JSON.stringify(label)).toBe('E_USAGE');
      }
      expect(await q.close()).toEqual({ released: [], failed: [] });
      expect(await releasedOn(rig)).toBe(true);
    });

    it('quiesce holds the server until unquiesce, which returns the label file and LSNs the image needs', async () => {
      const q = make();
      await q.connect();
      const info = await q.quiesce({ label: 'contract window', fast: true });
      expect(info.role).toBe(rig.role);
      expect(await rig.held()).toBe(true);
      expect(await codeOf(q.quiesce({ label: 'again' }))).toBe('E_USAGE');
      const r = await q.unquiesce();
      expect(r.role).toBe(rig.role);
      expect(r.labelFile).toContain('\nLABEL: contract window\n');
      expect(r.startLsn).toMatch(/^[0-9A-F]{1,8}\/[0-9A-F]{1,8}$/);
      if (rig.role === 'primary') expect(r.stopLsn).toMatch(/^[0-9A-F]{1,8}\/[0-9A-F]{1,8}$/);
      else expect(r.replayLsn).toMatch(/^[0-9A-F]{1,8}\/[0-9A-F]{1,8}$/);
      expect(r.timeline).toBeGreaterThanOrEqual(1);
      expect(r.backupSeconds).toBeGreaterThanOrEqual(0);
      expect(await codeOf(q.unquiesce())).toBe('E_USAGE');
    });

    it('a second window follows on the same quiescer: unquiesce really released the first', async () => {
      const q = make();
      await q.connect();
      await q.quiesce({ label: 'first' });
      await q.unquiesce();
      await q.quiesce({ label: 'second' });
      const r = await q.unquiesce();
      expect(r.labelFile).toContain('\nLABEL: second\n');
      expect(await q.close()).toEqual({ released: [], failed: [] });
      expect(await releasedOn(rig)).toBe(true);
    });

    it('unquiesce without quiesce is E_USAGE', async () => {
      const q = make();
      expect(await codeOf(q.unquiesce())).toBe('E_USAGE');
      await q.connect();
      expect(await codeOf(q.unquiesce())).toBe('E_USAGE');
    });

    it('close while quiesced releases the hold and says so; a second close releases and reports nothing', async () => {
      const q = make();
      await q.connect();
      await q.quiesce({ label: 'closed while held' });
      expect(await rig.held()).toBe(true);
      const report = await q.close();
      expect(report.failed).toEqual([]);
      expect(report.released.length).toBeGreaterThan(0);
      expect(await releasedOn(rig)).toBe(true);
      expect(await q.close()).toEqual({ released: [], failed: [] });
      expect(await codeOf(q.quiesce({ label: 'after close' }))).toBe('E_USAGE');
    });

    it('held past the watchdog: the hold is released by itself, and unquiesce is E_TIMEOUT', async () => {
      const q = make({ watchdogSeconds: 1 });
      await q.connect();
      await q.quiesce({ label: 'forgotten' });
      expect(await rig.held()).toBe(true);
      await until('the watchdog to release the hold', 10_000, async () => !(await rig.held()));
      expect(await codeOf(q.unquiesce())).toBe('E_TIMEOUT');
    });
  });
}
