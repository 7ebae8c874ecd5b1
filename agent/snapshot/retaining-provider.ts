import { constants } from 'node:fs';
import { copyFile, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';
import type { Snapshot, SnapshotProvider, VolumeSpec } from './snapshot-provider.js';
import type { VolumeIdentity } from './volume-identity.js';

/**
 * Wraps a SnapshotProvider and keeps a reflink clone of every snapshot just
 * before it is removed (agent config `retainSnapshotsDir`), so an operator or
 * a test can compare an exported image with the exact snapshot it came from.
 * Retained clones are not tracked: whoever asked for them deletes them.
 * The clone is a reflink (FICLONE), so it costs no space until the volume
 * diverges; on a filesystem without reflink it is a full copy.
 */
export class RetainingSnapshotProvider implements SnapshotProvider {
  readonly kind: string;
  readonly kept = new Map<string, string>();

  /** The inner provider's, if it has one (SnapshotProvider.volumeSize is optional). */
  readonly volumeSize?: (volume: VolumeSpec) => Promise<number>;

  constructor(private readonly inner: SnapshotProvider, private readonly keepDir: string) {
    this.kind = inner.kind;
    if (inner.volumeSize) this.volumeSize = (v) => inner.volumeSize!(v);
  }

  proveIdentity(volume: VolumeSpec): Promise<VolumeIdentity> {
    return this.inner.proveIdentity(volume);
  }

  create(volume: VolumeSpec, tag: string): Promise<Snapshot> {
    return this.inner.create(volume, tag);
  }

  createGroup(volumes: VolumeSpec[], tag: string): Promise<Snapshot[]> {
    if (!this.inner.createGroup) return Promise.reject(new BlocksnapError('E_CONFIG', `the ${this.kind} provider cannot snapshot a group at one instant`));
    return this.inner.createGroup(volumes, tag);
  }

  async remove(snapshot: Snapshot): Promise<void> {
    await mkdir(this.keepDir, { recursive: true });
    const dest = join(this.keepDir, `${snapshot.id.replace(/[^A-Za-z0-9._-]/g, '_')}.img`);
    try {
      await copyFile(snapshot.path, dest, constants.COPYFILE_FICLONE);
      this.kept.set(snapshot.id, dest);
    } catch (e) {
      // Nothing to retain if the snapshot is already gone; removal stays idempotent.
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
    return this.inner.remove(snapshot);
  }

  list(): Promise<Snapshot[]> {
    return this.inner.list();
  }

  cleanupStale(keep?: Set<string>): Promise<string[]> {
    return this.inner.cleanupStale(keep);
  }
}
