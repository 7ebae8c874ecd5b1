import { randomBytes } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { execa } from 'execa';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { Snapshot, SnapshotProvider, VolumeSpec } from '../../agent/snapshot/snapshot-provider.js';
import { isBlocksnapError } from '../../proto/errors.js';

/**
 * The SnapshotProvider contract (agent/snapshot/snapshot-provider.ts),
 * written once and run against every implementation: the reflink provider
 * on real loop devices in an XFS reflink pool, and the fake
 * (snapshot-provider-contract.test.ts). The LVM providers are held to it too.
 */
export interface SnapshotRig {
  /** A new provider instance over the rig's state; a second one is the agent after a restart. */
  provider(): SnapshotProvider;
  /** Two distinct volumes, each configured truly. */
  volumes: [VolumeSpec, VolumeSpec];
  /** The volume's size in bytes. */
  size(v: VolumeSpec): number;
  /** Writes DATA bytes to the volume durably, as an application would (through its filesystem, if it has one). */
  write(v: VolumeSpec, data: Buffer): Promise<void>;
  /** What the last `write` before the snapshot wrote, as the snapshot holds it. */
  readBack(s: Snapshot): Promise<Buffer>;
  teardown(): Promise<void>;
}

export const DATA = 65536;

/**
 * The bytes of FILE (at the filesystem's root) inside an unmounted ext4
 * image or device, through debugfs — what the rigs' readBack uses.
 * `stripFinalNewline: false`: execa strips one trailing "\n" from stdout by
 * default, also with `encoding: 'buffer'`, so random data whose last byte
 * was 0x0a (1 in 256) read back one byte short. That was the contract's
 * rare "snapshot ≠ the bytes written and fsync'ed" failure (lvm-classic in
 * the guest, reflink on the host): caught by a repro loop (220 groups), the
 * snapshot held all 65 536 bytes, debugfs printed them, the read-back had
 * 65 535. The snapshots were never wrong.
 */
export async function debugfsCat(image: string, file: string): Promise<Buffer> {
  const r = await execa('debugfs', ['-R', `cat /${file}`, image], { encoding: 'buffer', stdin: 'ignore', stripFinalNewline: false });
  return Buffer.from(r.stdout);
}

async function rejection(p: Promise<unknown>): Promise<Error> {
  return p.then(
    () => {
      throw new Error('expected a rejection');
    },
    (e: Error) => e,
  );
}

const gone = (path: string) => stat(path).then(() => false, () => true);

/** Bytes of a snapshot: a file's size, or a block device's (LVM snapshots; st_size is 0 there). */
async function sizeOf(path: string): Promise<number> {
  const st = await stat(path);
  if (!st.isBlockDevice()) return st.size;
  const major = Math.floor(st.rdev / 256) & 0xfff;
  const minor = (st.rdev & 0xff) | ((st.rdev >> 12) & ~0xff);
  return Number((await readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8')).trim()) * 512;
}

export function snapshotProviderContract(name: string, makeRig: () => Promise<SnapshotRig>): void {
  describe(`SnapshotProvider contract: ${name}`, () => {
    let rig: SnapshotRig;
    let a: VolumeSpec;
    let b: VolumeSpec;
    /** A volume whose backing store does not exist. */
    let broken: VolumeSpec;

    beforeAll(async () => {
      rig = await makeRig();
      [a, b] = rig.volumes;
      broken = { ...a, name: 'missing', image: `${a.image ?? '/nonexistent'}.missing`, device: '/dev/nonexistent-volume' };
    }, 120_000);
    afterEach(async () => {
      await rig.provider().cleanupStale();
    });
    afterAll(async () => {
      await rig?.teardown();
    });

    const ids = async (p: SnapshotProvider) => (await p.list()).map((s) => s.id).sort();

    it('create: the snapshot reads as the whole volume at its instant, and later writes do not change it', async () => {
      const p = rig.provider();
      const d1 = randomBytes(DATA);
      const d2 = randomBytes(DATA);
      // A last byte of "\n": a read-back that loses it (execa's default, see debugfsCat) fails every run, not 1 in 256.
      d1[DATA - 1] = 0x0a;
      await rig.write(a, d1);
      const s1 = await p.create(a, 'c1');
      await rig.write(a, d2);
      const s2 = await p.create(a, 'c2');
      expect(s1).toMatchObject({ id: `${a.name}@c1`, volume: a.name });
      expect(s1.freezeSeconds).toBeGreaterThanOrEqual(0);
      expect(s1.snapshotSeconds).toBeGreaterThanOrEqual(0);
      expect(await sizeOf(s1.path)).toBe(rig.size(a));
      expect((await rig.readBack(s1)).equals(d1)).toBe(true);
      expect((await rig.readBack(s2)).equals(d2)).toBe(true);
      expect(await ids(p)).toEqual([s1.id, s2.id].sort());
    });

    it('a tag already used for the volume is refused and the snapshot stays as it was', async () => {
      const p = rig.provider();
      const d = randomBytes(DATA);
      await rig.write(a, d);
      const s = await p.create(a, 'dup');
      await rig.write(a, randomBytes(DATA));
      expect(isBlocksnapError(await rejection(p.create(a, 'dup')))).toBe(true);
      expect((await rig.readBack(s)).equals(d)).toBe(true);
    });

    it('remove is idempotent; a removed snapshot is gone from list and from its path', async () => {
      const p = rig.provider();
      const s = await p.create(a, 'rm');
      await p.remove(s);
      expect(await gone(s.path)).toBe(true);
      expect(await ids(p)).not.toContain(s.id);
      await p.remove(s);
    });

    it('a failed create leaves nothing behind, and the volume stays writable', async () => {
      const p = rig.provider();
      const before = await ids(p);
      expect(isBlocksnapError(await rejection(p.create(broken, 'nope')))).toBe(true);
      expect(await ids(p)).toEqual(before);
      await rig.write(a, randomBytes(DATA)); // would hang on a filesystem left frozen
    });

    it('createGroup: every member at one instant, all or nothing', async () => {
      const p = rig.provider();
      if (!p.createGroup) return;
      const da = randomBytes(DATA);
      const db = randomBytes(DATA);
      db[DATA - 1] = 0x0a;
      await rig.write(a, da);
      await rig.write(b, db);
      const snaps = await p.createGroup([a, b], 'g1');
      expect(snaps.map((s) => s.id)).toEqual([`${a.name}@g1`, `${b.name}@g1`]);
      expect(snaps[0]!.freezeSeconds).toBe(snaps[1]!.freezeSeconds);
      expect((await rig.readBack(snaps[0]!)).equals(da)).toBe(true);
      expect((await rig.readBack(snaps[1]!)).equals(db)).toBe(true);
      expect(isBlocksnapError(await rejection(p.createGroup([a, broken], 'g2')))).toBe(true);
      expect(await ids(p)).toEqual(snaps.map((s) => s.id).sort());
    });

    it('cleanupStale: a new instance removes what an earlier one left, except what it is told to keep, and says what it released', async () => {
      const earlier = rig.provider();
      const s1 = await earlier.create(a, 'old1');
      const s2 = await earlier.create(b, 'old2');
      const p = rig.provider();
      expect(await ids(p)).toEqual([s1.id, s2.id].sort());
      const released = await p.cleanupStale(new Set([s2.id]));
      expect(released.some((r) => r.includes(s1.id))).toBe(true);
      expect(released.some((r) => r.includes(s2.id))).toBe(false);
      expect(await ids(p)).toEqual([s2.id]);
      expect(await gone(s1.path)).toBe(true);
      expect(await p.cleanupStale()).toEqual([expect.stringContaining(s2.id)]);
      expect(await p.cleanupStale()).toEqual([]);
    });

    it('proveIdentity: a true volume is proven without holding anything; one naming another volume\'s device or mountpoint is E_IDENTITY', async () => {
      const p = rig.provider();
      const id = await p.proveIdentity(a);
      expect(id.volume).toBe(a.name);
      expect(id.device.size).toBe(rig.size(a));
      for (const lie of [{ ...a, mountpoint: b.mountpoint }, { ...a, device: b.device }]) {
        const e = await rejection(p.proveIdentity(lie));
        expect(isBlocksnapError(e, 'E_IDENTITY'), String(e)).toBe(true);
      }
      expect(await ids(p)).toEqual([]);
      await rig.write(a, randomBytes(DATA));
    });
  });
}
