import { BlocksnapError } from '../../proto/errors.js';
import { decodeManifest, encodeManifest, isValidImageId, type Manifest } from '../store/manifest.js';
import type { ManifestStore } from '../store/manifest-store.js';
import type { QuarantineRecord } from '../store/quarantine.js';

/**
 * In-memory ManifestStore for tests (it passes
 * test/store/manifest-store.contract.ts). It keeps the encoded bytes, as a
 * backend would, so `get` decodes and verifies like the filesystem store and
 * a test can damage a manifest (`putRaw`). Two stores over one `objects` map
 * are the same store opened twice (a reopen).
 */
export class MemoryManifestStore implements ManifestStore {
  readonly quarantined: QuarantineRecord[] = [];

  constructor(readonly objects: Map<string, Buffer> = new Map()) {}

  async put(m: Manifest): Promise<void> {
    const bytes = encodeManifest(m);
    if (this.objects.has(m.imageId)) throw new BlocksnapError('E_STORE_IO', `manifest ${m.imageId} already exists`);
    this.objects.set(m.imageId, bytes);
  }

  async get(imageId: string): Promise<Manifest> {
    checkId(imageId);
    const bytes = this.objects.get(imageId);
    if (!bytes) throw new BlocksnapError('E_NOT_FOUND', `manifest ${imageId}: not found`);
    const m = decodeManifest(bytes);
    if (m.imageId !== imageId) throw new BlocksnapError('E_STORE_CORRUPT', `manifest ${imageId} holds image ${m.imageId}`);
    return m;
  }

  async list(): Promise<string[]> {
    return [...this.objects.keys()].sort();
  }

  async remove(imageId: string): Promise<void> {
    checkId(imageId);
    this.objects.delete(imageId);
  }

  async quarantine(imageId: string, reason: string): Promise<QuarantineRecord> {
    checkId(imageId);
    this.objects.delete(imageId);
    const rec: QuarantineRecord = {
      object: `manifest ${imageId}`, kind: 'manifest', from: `manifests/${imageId}`, to: `quarantine/${imageId}`, reason, at: new Date().toISOString(),
    };
    this.quarantined.push(rec);
    return rec;
  }

  /** Stores bytes under `imageId` as they are (a damaged or misplaced manifest). */
  putRaw(imageId: string, bytes: Buffer): void {
    this.objects.set(imageId, bytes);
  }
}

function checkId(imageId: string): void {
  if (!isValidImageId(imageId)) throw new BlocksnapError('E_FORMAT', `manifest: invalid image id ${JSON.stringify(imageId)}`);
}
