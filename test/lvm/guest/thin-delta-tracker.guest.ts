/**
 * The Tracker contract (test/agent/tracker.contract.ts) against the
 * thin-delta tracker on a real thin LV in the guest: one pool for the file,
 * a fresh, fully provisioned thin LV per test (a discard of a never-written
 * thin block changes nothing, so the rig writes every block first). The
 * LVs and their basis snapshots go at the end of the file with the volume
 * group (one `vgremove`, also after a failure) rather than by an `lvremove`
 * per test: each LVM command costs about a second in the ptrace'd guest.
 */
import { open } from 'node:fs/promises';
import { constants } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { execa } from 'execa';
import { pino } from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import { ThinDeltaTracker, cleanupStaleThinDelta } from '../../../agent/cbt/thin-delta/thin-delta-tracker.js';
import { listLvs } from '../../../agent/snapshot/lvm/lvm-cli.js';
import { CONTRACT_CHUNK, trackerContract, type ContractRig } from '../../agent/tracker.contract.js';
import { POOL, VG, makeVg, sh } from './lvm-rig.js';

const SIZE = 4 * 1024 * 1024;
let vgReady: Promise<void> | null = null;
let n = 0;
const log = pino({ level: 'silent' });

async function writeAt(device: string, offset: number, length: number): Promise<void> {
  const fh = await open(device, constants.O_WRONLY | constants.O_SYNC);
  try {
    await fh.write(randomBytes(length), 0, length, offset);
  } finally {
    await fh.close();
  }
}

async function makeRig(): Promise<ContractRig> {
  vgReady ??= (async () => {
    await makeVg();
    await sh('lvcreate', ['-q', '-L', '256M', '--chunksize', `${CONTRACT_CHUNK / 1024}k`, '-Zn', '-T', `${VG}/${POOL}`]);
  })();
  await vgReady;
  const name = `t${++n}`;
  await sh('lvcreate', ['-q', '-V', `${SIZE / 1024 / 1024}M`, '-T', `${VG}/${POOL}`, '-n', name]);
  const device = `/dev/${VG}/${name}`;
  await sh('dd', ['if=/dev/urandom', `of=${device}`, 'bs=1M', `count=${SIZE / 1024 / 1024}`, 'oflag=direct', 'status=none']);
  return {
    tracker: new ThinDeltaTracker({ log }),
    device,
    deviceSize: SIZE,
    write: (offset, length) => writeAt(device, offset, length),
    discard: async (offset, length) => void (await sh('blkdiscard', ['-o', String(offset), '-l', String(length), device])),
    another: () => new ThinDeltaTracker({ log }),
    teardown: async () => {}, // the file's afterAll removes the volume group
  };
}

trackerContract('thin-delta (thin_delta on a real thin pool in a user-mode-linux guest)', makeRig);

afterAll(async () => {
  await execa('vgremove', ['-q', '-f', VG], { reject: false });
});

describe('thin-delta specifics', () => {
  it('keeps one basis snapshot only while it is the basis; a basis removed outside blocksnap invalidates with the reason', async () => {
    const rig = await makeRig();
    const t = rig.tracker;
    try {
      await t.start({ device: rig.device, chunkSize: CONTRACT_CHUNK, generation: 1 });
      for (let i = 0; i < 3; i++) {
        await t.prepareSwitch();
        await t.completeSwitch();
      }
      const bases = (await listLvs([VG])).filter((l) => l.tags.includes('bsn.basis') && l.origin === rig.device.split('/').pop());
      expect(bases).toHaveLength(1);
      await sh('lvremove', ['-q', '-f', `${VG}/${bases[0]!.name}`]);
      await rig.write(2 * CONTRACT_CHUNK, 4096);
      await t.prepareSwitch();
      const g = await t.completeSwitch();
      expect(g.validity.valid).toBe(false);
      expect(!g.validity.valid && g.validity.reason).toMatch(/basis snapshot .* is gone/);
    } finally {
      if (t.phase !== 'stopped') await t.stop();
      await rig.teardown();
    }
  });

  it('trackers of two LVs of one pool checkpointing at once (and a periodic save racing a switch): no EBUSY from the pool, both stay valid', async () => {
    // A pool holds one metadata snapshot at a time; before the per-pool queue the second
    // reserve_metadata_snap failed with EBUSY and invalidated that tracker (seen in the e2e).
    const rigs = [await makeRig(), await makeRig()];
    try {
      for (const r of rigs) {
        await r.tracker.start({ device: r.device, chunkSize: CONTRACT_CHUNK, generation: 1 });
        await r.tracker.prepareSwitch(); // generation 1 is invalid (no saved bitmap); 2 starts valid
        await r.tracker.completeSwitch();
      }
      await rigs[0]!.write(0, 4096);
      // Several rounds of four at once: reserve … release windows overlap for sure without the queue.
      for (let round = 0; round < 2; round++) {
        const cps = await Promise.all([...rigs, ...rigs].map((r) => r.tracker.checkpoint()));
        for (const c of cps) expect(c.validity, JSON.stringify(c.validity)).toEqual({ valid: true });
      }
      const [c] = await Promise.all([rigs[1]!.tracker.checkpoint(), rigs[0]!.tracker.prepareSwitch()]);
      expect(c.validity, JSON.stringify(c.validity)).toEqual({ valid: true });
      const g = await rigs[0]!.tracker.completeSwitch();
      expect(g.validity, JSON.stringify(g.validity)).toEqual({ valid: true });
    } finally {
      for (const r of rigs) if (r.tracker.phase !== 'stopped') await r.tracker.stop();
      for (const r of rigs) await r.teardown();
    }
  });

  it('cleanupStale releases a metadata snapshot a killed run left reserved', async () => {
    await (vgReady ?? makeRig());
    await sh('dmsetup', ['message', `${VG}-${POOL}-tpool`, '0', 'reserve_metadata_snap']);
    expect(await cleanupStaleThinDelta()).toContain(`metadata snapshot of ${VG}/${POOL}`);
    expect(await cleanupStaleThinDelta()).toEqual([]);
  });
});
