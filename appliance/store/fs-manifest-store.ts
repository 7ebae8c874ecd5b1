import path from 'node:path';
import { listManifests, manifestPath, readManifest, removeManifest, writeManifest, type Manifest } from './manifest.js';
import type { ManifestStore } from './manifest-store.js';
import { quarantineFile, type QuarantineRecord } from './quarantine.js';

/**
 * Manifests as files: `store/manifests/<imageId>.json`, written to
 * `store/tmp/`, fsync'ed, renamed, directory fsync'ed (manifest.ts holds the
 * format and the file operations); a damaged one goes to `DATA/quarantine/`.
 */
export class FsManifestStore implements ManifestStore {
  /** `dataDir` defaults to the store directory's parent (DATA/store). */
  constructor(readonly storeDir: string, private readonly dataDir = path.dirname(path.resolve(storeDir))) {}

  async put(m: Manifest): Promise<void> {
    await writeManifest(this.storeDir, m);
  }

  get(imageId: string): Promise<Manifest> {
    return readManifest(this.storeDir, imageId);
  }

  list(): Promise<string[]> {
    return listManifests(this.storeDir);
  }

  remove(imageId: string): Promise<void> {
    return removeManifest(this.storeDir, imageId);
  }

  quarantine(imageId: string, reason: string): Promise<QuarantineRecord> {
    return quarantineFile(this.dataDir, manifestPath(this.storeDir, imageId), 'manifest', `manifest ${imageId}`, reason);
  }
}
