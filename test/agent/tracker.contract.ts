import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ChangeBitmap } from '../../agent/cbt/change-bitmap.js';
import type { ClosedGeneration, Tracker } from '../../agent/cbt/tracker.js';
import { isBlocksnapError } from '../../proto/errors.js';

/**
 * The Tracker contract (agent/cbt/tracker.ts), run against every
 * implementation. A rig gives a fresh device and an unstarted tracker, and
 * ways to change the device the way a real workload would.
 */
export interface ContractRig {
  tracker: Tracker;
  device: string;
  deviceSize: number;
  /** Writes `length` bytes at `offset` (both multiples of 512) and returns once written. */
  write(offset: number, length: number): Promise<void>;
  /** Discards a range (multiples of 4096). */
  discard(offset: number, length: number): Promise<void>;
  /** A second, unstarted tracker for the same device (restart scenarios). */
  another(): Tracker;
  /** Releases everything the rig created (the tracker is stopped by then or not). */
  teardown(): Promise<void>;
}

export const CONTRACT_CHUNK = 65536;

async function expectTrackerError(p: Promise<unknown> | (() => unknown)): Promise<void> {
  let err: unknown;
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    err = e;
  }
  expect(isBlocksnapError(err, 'E_TRACKER'), String(err)).toBe(true);
}

async function cut(t: Tracker): Promise<ClosedGeneration> {
  await t.prepareSwitch();
  return t.completeSwitch();
}

const C = CONTRACT_CHUNK;

export function trackerContract(name: string, makeRig: () => Promise<ContractRig>): void {
  describe(`Tracker contract: ${name}`, () => {
    let rig: ContractRig;
    let t: Tracker;

    beforeEach(async () => {
      rig = await makeRig();
      t = rig.tracker;
    });
    afterEach(async () => {
      try {
        await stopIfRunning(t);
      } finally {
        await rig.teardown();
      }
    });

    it('opens the requested generation, invalid after a fresh start, valid after the first switch', async () => {
      await t.start({ device: rig.device, chunkSize: C, generation: 7 });
      expect(t.phase).toBe('tracking');
      expect(t.generation).toBe(7);
      const v = t.validity();
      expect(v.valid).toBe(false);
      expect(!v.valid && v.reason).toMatch(/without a saved bitmap/);
      const closed = await cut(t);
      expect(closed.generation).toBe(7);
      expect(closed.validity.valid).toBe(false);
      expect(t.generation).toBe(8);
      expect(t.validity()).toEqual({ valid: true });
      expect(t.startInfo.identity.size).toBe(rig.deviceSize);
    });

    it('marks exactly the chunks written, spanned and discarded', async () => {
      await t.start({ device: rig.device, chunkSize: C, generation: 1 });
      await cut(t);
      await rig.write(3 * C + 4096, 4096); // inside chunk 3
      await rig.write(10 * C - 512, 1024); // spans chunks 9 and 10: both are marked
      await rig.discard(20 * C, 2 * C); // chunks 20, 21
      const g = await cut(t);
      expect(g.validity).toEqual({ valid: true });
      expect([...g.bitmap.indexes()]).toEqual([3, 9, 10, 20, 21]);
      const next = await cut(t);
      expect(next.bitmap.count()).toBe(0);
    });

    it('puts a write racing the snapshot into both generations (superset, never a gap)', async () => {
      await t.start({ device: rig.device, chunkSize: C, generation: 1 });
      await cut(t);
      await rig.write(1 * C, 4096); // before the switch: G (and G+1 if its record is read after prepareSwitch)
      await t.prepareSwitch();
      expect(t.phase).toBe('switching');
      expect(t.generation).toBe(2);
      await rig.write(2 * C, 4096); // racing: G and G+1
      const g = await t.completeSwitch();
      await rig.write(4 * C, 4096); // after: G+1 only
      const g1 = await cut(t);
      expect(g.generation).toBe(2);
      expect([...g.bitmap.indexes()]).toEqual([1, 2]);
      expect(g1.generation).toBe(3);
      // G+1 must hold the racing write and the later one. It may also hold the
      // write made just before prepareSwitch: the kernel tracker applies a
      // record when it reads it, and one read after prepareSwitch lands in both
      // generations — an allowed extra bit (a superset), never a gap.
      const next = [...g1.bitmap.indexes()];
      expect(next).toContain(2);
      expect(next).toContain(4);
      expect(next.filter((i) => i !== 1)).toEqual([2, 4]);
    });

    it('keeps everything in the open generation when a switch is aborted', async () => {
      await t.start({ device: rig.device, chunkSize: C, generation: 1 });
      await cut(t);
      await rig.write(5 * C, 512);
      await t.prepareSwitch();
      await rig.write(6 * C, 512);
      await t.abortSwitch();
      expect(t.generation).toBe(2);
      await rig.write(7 * C, 512);
      const g = await cut(t);
      expect(g.generation).toBe(2);
      expect([...g.bitmap.indexes()]).toEqual([5, 6, 7]);
    });

    it('absorbs a closed generation whose image was not committed: bits unioned, validity combined', async () => {
      await t.start({ device: rig.device, chunkSize: C, generation: 1 });
      await cut(t);
      await rig.write(3 * C, 4096);
      const failed = await cut(t); // its job failed: the image was never committed
      await rig.write(8 * C, 4096);
      t.absorb(failed);
      const g = await cut(t);
      expect(g.validity).toEqual({ valid: true });
      expect([...g.bitmap.indexes()]).toEqual([3, 8]);
      // An invalid generation taints the one it is absorbed into.
      await rig.write(9 * C, 4096);
      t.invalidate('test: lost events');
      const bad = await cut(t);
      expect(bad.validity.valid).toBe(false);
      t.absorb(bad);
      const after = await cut(t);
      expect(after.validity.valid).toBe(false);
      // 9, and maybe 8: the write before the previous cut may be read after its prepareSwitch (a superset).
      expect([...after.bitmap.indexes()].filter((i) => i !== 8)).toEqual([9]);
      await expectTrackerError(() => t.absorb({ ...after, generation: t.generation })); // must be older than the open one
    });

    it('resumes from an initial bitmap of the same device, and refuses one of another size', async () => {
      await t.start({ device: rig.device, chunkSize: C, generation: 4 });
      const identity = t.startInfo.identity;
      await t.stop();
      const initial = new ChangeBitmap(rig.deviceSize, C);
      initial.setChunk(30);
      const again = rig.another();
      try {
        await again.start({ device: rig.device, chunkSize: C, generation: 4, initial: { bitmap: initial, identity } });
        expect(again.validity()).toEqual({ valid: true });
        await rig.write(31 * C, 512);
        const g = await cut(again);
        expect(g.generation).toBe(4);
        expect(g.validity).toEqual({ valid: true });
        expect([...g.bitmap.indexes()]).toEqual([30, 31]);
        expect([...initial.indexes()]).toEqual([30]); // the caller's bitmap is not modified
      } finally {
        await stopIfRunning(again);
      }
      const wrong = rig.another();
      try {
        const bigger = { ...identity, size: identity.size * 2 };
        await wrong.start({
          device: rig.device,
          chunkSize: C,
          generation: 4,
          initial: { bitmap: new ChangeBitmap(bigger.size, C).fill(), identity: bigger },
        });
        const v = wrong.validity();
        expect(!v.valid && v.reason).toMatch(/device size changed/);
        expect((await cut(wrong)).bitmap.count()).toBe(0);
      } finally {
        await stopIfRunning(wrong);
      }
    });

    it('invalidates with a reason; the next generation is valid again', async () => {
      await t.start({ device: rig.device, chunkSize: C, generation: 1 });
      await cut(t);
      t.invalidate('test reason one');
      t.invalidate('test reason two');
      expect(t.validity()).toEqual({ valid: false, reason: 'test reason one' });
      const g = await cut(t);
      expect(g.validity).toEqual({ valid: false, reason: 'test reason one' });
      expect(t.validity()).toEqual({ valid: true });
      await t.prepareSwitch();
      t.invalidate('during the switch');
      const g2 = await t.completeSwitch();
      expect(g2.validity.valid).toBe(false);
      expect(t.validity()).toEqual({ valid: false, reason: 'during the switch' });
    });

    it('refuses calls out of order and after stop; stop is idempotent', async () => {
      await expectTrackerError(t.prepareSwitch());
      await t.start({ device: rig.device, chunkSize: C, generation: 1 });
      await expectTrackerError(t.start({ device: rig.device, chunkSize: C, generation: 1 }));
      await expectTrackerError(t.completeSwitch());
      await expectTrackerError(t.abortSwitch());
      await t.prepareSwitch();
      await expectTrackerError(t.prepareSwitch());
      await t.abortSwitch();
      const a = await t.stop();
      const b = await t.stop();
      expect(b).toBe(a);
      expect(t.phase).toBe('stopped');
      await expectTrackerError(t.prepareSwitch());
      await expectTrackerError(t.checkpoint());
      await expectTrackerError(() => t.validity());
    });

    it('checkpoints a copy with identity and counters that move with writes', async () => {
      await t.start({ device: rig.device, chunkSize: C, generation: 1 });
      await cut(t);
      await rig.write(8 * C, 4096);
      const cp1 = await t.checkpoint();
      expect(cp1.generation).toBe(2);
      expect(cp1.chunkSize).toBe(C);
      expect(cp1.identity).toEqual(t.startInfo.identity);
      expect([...cp1.bitmap.indexes()]).toEqual([8]);
      cp1.bitmap.setChunk(50);
      await rig.write(9 * C, 4096);
      const cp2 = await t.checkpoint();
      expect([...cp2.bitmap.indexes()]).toEqual([8, 9]);
      expect(cp2.counters.writeIos).toBeGreaterThan(cp1.counters.writeIos);
      const final = await t.stop();
      expect([...final.bitmap.indexes()]).toEqual([8, 9]);
    });

  });
}

async function stopIfRunning(t: Tracker): Promise<void> {
  if (t.phase !== 'new' && t.phase !== 'stopped') await t.stop();
}
