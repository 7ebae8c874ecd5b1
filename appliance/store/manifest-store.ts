import type { QuarantineRecord } from './quarantine.js';
import type { Manifest } from './manifest.js';

/**
 * Where committed manifests live (DESIGN.md §2, §3.4): a put-once store of
 * immutable named objects, the commit records of images. The commit
 * (appliance/jobs/image-commit.ts) and the start-up recovery
 * (appliance/server/recovery.ts) go through it, so another backend (an
 * S3-compatible bucket) is one new implementation.
 *
 * Contract (every implementation passes test/store/manifest-store.contract.ts:
 * FsManifestStore and the tests' MemoryManifestStore):
 * - `put(m)` is the commit point: durable (visible to `list`/`get`, also
 *   after a reopen) when it resolves, and all-or-nothing (a crash leaves no
 *   partial manifest). A manifest whose id is already there is refused
 *   (E_STORE_IO) and the stored one is kept.
 * - `get(id)` returns the manifest verified (checksum; the id inside is the
 *   one asked for): E_STORE_CORRUPT if not, E_NOT_FOUND if absent, E_FORMAT
 *   for an id that is not an image id (ids never come from clients).
 * - `list()` returns the ids of stored manifests, sorted (= by creation time);
 *   it never reads them.
 * - `remove(id)` (roll-forward of an incomplete set only) is durable when it
 *   resolves; an absent id is not an error.
 * - `quarantine(id, reason)` moves a manifest `get` refused out of `list()`
 *   to where an operator can inspect it, and says where.
 */
export interface ManifestStore {
  put(m: Manifest): Promise<void>;
  get(imageId: string): Promise<Manifest>;
  list(): Promise<string[]>;
  remove(imageId: string): Promise<void>;
  quarantine(imageId: string, reason: string): Promise<QuarantineRecord>;
}
