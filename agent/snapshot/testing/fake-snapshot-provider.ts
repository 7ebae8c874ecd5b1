import { mkdir, readdir, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { BlocksnapError } from '../../../proto/errors.js';
import { FakeBlockDevice } from '../../cbt/testing/memory-tracker.js';
import type { Snapshot, SnapshotProvider, VolumeSpec } from '../snapshot-provider.js';
import { devString, VolumeIdentityError, type IdentityMismatch, type VolumeIdentity } from '../volume-identity.js';

/**
 * A pretend volume for tests of the code that snapshots, tracks and reads
 * volumes: its bytes live in memory, and every write also goes to a
 * FakeBlockDevice, so a MemoryTracker over `device` sees it as a kernel
 * tracker would. Nothing is mounted: `spec.mountpoint` is a name only.
 */
export class FakeVolume {
  readonly bytes: Buffer;
  readonly device: FakeBlockDevice;
  readonly spec: VolumeSpec;

  constructor(name: string, size: number, opts: { chunkSize?: number; minor?: number } = {}) {
    this.bytes = Buffer.alloc(size);
    this.device = new FakeBlockDevice(`/dev/fake-${name}`, size, { minor: opts.minor ?? 100 + fakeMinor++ });
    this.spec = { name, device: this.device.path, mountpoint: `/fake/${name}`, chunkSize: opts.chunkSize ?? 65536 };
  }

  write(offset: number, data: Uint8Array): void {
    if (offset < 0 || offset + data.length > this.bytes.length) throw new RangeError(`write beyond ${this.spec.name}`);
    this.bytes.set(data, offset);
    this.device.write(offset, data.length);
  }
}

let fakeMinor = 0;
const TAG = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;

/**
 * A SnapshotProvider over FakeVolumes: a snapshot is a copy of the volume's
 * bytes taken synchronously (one instant for a whole group, as nothing else
 * runs meanwhile), written to `<dir>/<volume>@<tag>.snap`, so the code under
 * test reads it like a reflink clone. It keeps no state but those files:
 * another instance over the same `dir` finds them (cleanupStale after a restart).
 * Passes test/agent/snapshot-provider.contract.ts.
 */
export class FakeSnapshotProvider implements SnapshotProvider {
  readonly kind = 'fake';
  private readonly volumes: Map<string, FakeVolume>;

  constructor(private readonly dir: string, volumes: Iterable<FakeVolume>) {
    this.volumes = new Map([...volumes].map((v) => [v.spec.name, v]));
  }

  async proveIdentity(spec: VolumeSpec): Promise<VolumeIdentity> {
    const v = this.volumes.get(spec.name);
    if (!v) throw new VolumeIdentityError(spec.name, [{ field: 'device', configured: spec.device, found: 'no such fake volume' }]);
    const mismatches: IdentityMismatch[] = [];
    if (spec.device !== v.spec.device) mismatches.push({ field: 'device', configured: spec.device, found: `${spec.name} is on ${v.spec.device}` });
    if (spec.mountpoint !== v.spec.mountpoint) mismatches.push({ field: 'mountpoint', configured: spec.mountpoint, found: `${spec.name} is mounted at ${v.spec.mountpoint}` });
    if (mismatches.length) throw new VolumeIdentityError(spec.name, mismatches);
    const id = v.device.identity;
    return {
      volume: spec.name,
      device: { ...id, path: v.spec.device },
      backing: { kind: 'memory', path: `memory:${spec.name}`, dev: '0:0', ino: '0', size: v.bytes.length },
      mount: { path: v.spec.mountpoint, dev: devString(id.major, id.minor), fstype: 'fake' },
    };
  }

  /** A fake volume has no file or device to measure: the agent asks here. */
  async volumeSize(spec: VolumeSpec): Promise<number> {
    const v = this.volumes.get(spec.name);
    if (!v) throw new BlocksnapError('E_CONFIG', `no fake volume ${spec.name}`);
    return v.bytes.length;
  }

  async create(volume: VolumeSpec, tag: string): Promise<Snapshot> {
    return (await this.createGroup([volume], tag))[0]!;
  }

  async createGroup(specs: VolumeSpec[], tag: string): Promise<Snapshot[]> {
    const started = performance.now();
    if (specs.length === 0) throw new BlocksnapError('E_CONFIG', 'a snapshot group needs at least one volume');
    if (!TAG.test(tag)) throw new BlocksnapError('E_CONFIG', `invalid snapshot tag ${JSON.stringify(tag)}`);
    await mkdir(this.dir, { recursive: true });
    const items: Array<{ v: FakeVolume; id: string; file: string }> = [];
    for (const spec of specs) {
      const v = this.volumes.get(spec.name);
      if (!v) throw new BlocksnapError('E_SNAPSHOT', `no fake volume ${spec.name}`);
      if (items.some((it) => it.v === v)) throw new BlocksnapError('E_CONFIG', `volume ${spec.name} appears twice in the group`);
      const id = `${spec.name}@${tag}`;
      const file = path.join(this.dir, `${id}.snap`);
      if (await exists(file)) throw new BlocksnapError('E_SNAPSHOT', `snapshot ${id} already exists at ${file}`);
      items.push({ v, id, file });
    }
    // The instant: every member's bytes copied with nothing running in between.
    const copies = items.map((it) => Buffer.from(it.v.bytes));
    const written: string[] = [];
    try {
      for (const [i, it] of items.entries()) {
        await writeFile(it.file, copies[i]!, { flag: 'wx' });
        written.push(it.file);
      }
    } catch (e) {
      for (const f of written) await rm(f, { force: true });
      throw new BlocksnapError('E_SNAPSHOT', `cannot write fake snapshot ${items.map((it) => it.id).join(', ')}`, { cause: e });
    }
    const createdAt = new Date();
    const snapshotSeconds = (performance.now() - started) / 1000;
    return items.map((it) => ({ id: it.id, volume: it.v.spec.name, path: it.file, createdAt, freezeSeconds: 0, snapshotSeconds }));
  }

  async remove(snapshot: Snapshot): Promise<void> {
    if (snapshot.path !== path.join(this.dir, `${snapshot.id}.snap`)) {
      throw new BlocksnapError('E_SNAPSHOT', `${snapshot.path} is not a fake snapshot of ${snapshot.id}`);
    }
    await rm(snapshot.path, { force: true });
  }

  async list(): Promise<Snapshot[]> {
    const names = await readdir(this.dir).catch((e: NodeJS.ErrnoException) => {
      if (e.code === 'ENOENT') return [] as string[];
      throw e;
    });
    const out: Snapshot[] = [];
    for (const name of names.sort()) {
      const at = name.indexOf('@');
      if (!name.endsWith('.snap') || at < 1) continue;
      const file = path.join(this.dir, name);
      const st = await stat(file).catch(() => undefined);
      if (!st) continue;
      out.push({ id: name.slice(0, -'.snap'.length), volume: name.slice(0, at), path: file, createdAt: st.mtime, freezeSeconds: 0, snapshotSeconds: 0 });
    }
    return out;
  }

  async cleanupStale(keep: Set<string> = new Set()): Promise<string[]> {
    const released: string[] = [];
    for (const s of await this.list()) {
      if (keep.has(s.id)) continue;
      await this.remove(s);
      released.push(`snapshot:${s.id}`);
    }
    return released;
  }
}

async function exists(p: string): Promise<boolean> {
  return stat(p).then(
    () => true,
    () => false,
  );
}
