/**
 * What the appliance does with damage it finds, at start and in the offline
 * maintenance commands (DESIGN.md §6): an unreadable object is quarantined
 * (store/quarantine.ts) and named, the images that need it are marked
 * damaged in the catalog, and everything else keeps working.
 *
 * - rollForward (../jobs/image-commit.ts, the other half of the commit):
 *   manifests without a catalog row get one; one that does not decode is
 *   quarantined and its image recorded as damaged.
 * - openCatalogOrRecover: a catalog SQLite cannot read is quarantined and
 *   recreated; its agents (and their credentials) are salvaged if that table
 *   still reads, the images come back from the manifests.
 * - checkImages: every image's manifest and root blob are there; with
 *   `deep` (something was lost at this start) also every page blob. Never
 *   every chunk: that is `verify`'s job.
 */
import { join } from 'node:path';
import type { Logger } from 'pino';
import { BlocksnapError, toBlocksnapError } from '../../proto/errors.js';
import { Catalog } from '../catalog/catalog.js';
import { ZERO_DIGEST, type ChunkStore } from '../store/chunk-store.js';
import type { SkippedPack } from '../store/blob-index.js';
import type { VerifyReport } from '../ops/verify-image.js';
import { FsChunkStore, type StoreRecovery } from '../store/fs-chunk-store.js';
import { ImageIndexReader } from '../store/image-index.js';
import { FsManifestStore } from '../store/fs-manifest-store.js';
import type { ApplianceBackends } from './appliance.js';
import type { ManifestStore } from '../store/manifest-store.js';
import { quarantineFile, type QuarantineRecord } from '../store/quarantine.js';
import { takeDataDirLock } from './data-lock.js';
import { rollForward } from '../jobs/image-commit.js';

export { rollForward };

export interface DamagedImage {
  imageId: string;
  objects: { object: string; reason: string }[];
}

/**
 * Opens the catalog; an unreadable one is quarantined (with its -wal/-shm)
 * and a new one created, with the agents salvaged from the old file when
 * that table still reads. `rebuilt` tells the caller to roll forward with
 * `createAgents` (every manifest lacks a row now).
 */
export async function openCatalogOrRecover(
  dataDir: string, log?: Logger,
): Promise<{ catalog: Catalog; rebuilt: QuarantineRecord | null; agentsSalvaged: number }> {
  const file = join(dataDir, 'catalog.sqlite');
  try {
    return { catalog: Catalog.open(file), rebuilt: null, agentsSalvaged: 0 };
  } catch (e) {
    if (!(e instanceof BlocksnapError) || e.code !== 'E_STORE_CORRUPT') throw e;
    const agents = Catalog.salvageAgents(file);
    const rec = await quarantineFile(dataDir, file, 'catalog', 'catalog.sqlite', e.message, [`${file}-wal`, `${file}-shm`]);
    const catalog = Catalog.open(file);
    const n = catalog.restoreAgents(agents);
    log?.error({ reason: e.message, movedTo: rec.to, agentsSalvaged: n },
      'the catalog was unreadable: quarantined and rebuilt from the manifests (job history is gone; agents that were not salvaged need `agents rotate`)');
    return { catalog, rebuilt: rec, agentsSalvaged: n };
  }
}

/**
 * Marks images damaged that miss their manifest file or their root blob and,
 * with `deep`, a page blob. `lost` names the object a vanished blob was in.
 * Page digests shared between images are checked once.
 */
export async function checkImages(
  catalog: Catalog, store: ChunkStore, manifestStore: ManifestStore,
  opts: { deep: boolean; lost?: Map<string, string>; quarantined?: QuarantineRecord[]; log?: Logger },
): Promise<DamagedImage[]> {
  const manifests = new Set(await manifestStore.list());
  const out: DamagedImage[] = [];
  const pagesOk = new Set<string>();
  const nameOf = (hex: string, what: string) => opts.lost?.get(hex) ?? `${what} blob ${hex}`;
  // A blob of a quarantined pack whose trailer was unreadable cannot be named by pack: say which packs went.
  const went = (opts.quarantined ?? []).filter((q) => q.kind === 'pack').map((q) => q.object);
  const notReadable = `is not in any readable pack${went.length ? ` (quarantined: ${went.join(', ')})` : ''}`;
  for (const img of catalog.listImages()) {
    if (!img.rootDigest) continue; // a placeholder: its damage is already recorded
    const bad: { object: string; reason: string }[] = [];
    if (!manifests.has(img.id)) bad.push({ object: `manifest ${img.id}`, reason: 'manifest file is missing' });
    const root = Buffer.from(img.rootDigest, 'hex');
    if (!store.has(root)) {
      bad.push({ object: nameOf(img.rootDigest, 'root'), reason: `root blob ${img.rootDigest} ${notReadable}` });
    } else if (opts.deep) {
      try {
        const reader = await ImageIndexReader.open(store, root);
        for (const d of reader.pageDigests()) {
          if (d.equals(ZERO_DIGEST)) continue;
          const hex = d.toString('hex');
          if (pagesOk.has(hex)) continue;
          if (store.has(d)) pagesOk.add(hex);
          else bad.push({ object: nameOf(hex, 'page'), reason: `page blob ${hex} ${notReadable}` });
        }
      } catch (e) {
        bad.push({ object: nameOf(img.rootDigest, 'root'), reason: toBlocksnapError(e, 'E_STORE_CORRUPT').message });
      }
    }
    if (bad.length === 0) continue;
    // One row per object: many pages lost with one pack name that pack once.
    const seen = new Set<string>();
    const objects = bad.filter((b) => !seen.has(b.object) && seen.add(b.object));
    for (const b of objects) catalog.recordDamage(img.id, b.object, b.reason);
    out.push({ imageId: img.id, objects });
    opts.log?.error({ image: img.id, objects }, 'image is damaged');
  }
  return out;
}

export interface RebuildReport {
  added: number;
  /** Objects moved to the quarantine: unreadable manifests, the catalog itself. */
  quarantined: QuarantineRecord[];
  damaged: DamagedImage[];
  agentsSalvaged: number;
}

/**
 * `catalog rebuild`: with the data directory's lock; works when catalog.sqlite
 * itself is unreadable. The stores come from the CLI's composition
 * (appliance/compose.ts), opened once the lock is held.
 */
export async function rebuildCatalog(
  dataDir: string, stores: Pick<ApplianceBackends, 'openChunkStore' | 'openManifestStore'>, log?: Logger,
): Promise<RebuildReport> {
  const lock = takeDataDirLock(dataDir, 'catalog rebuild');
  try {
    const { catalog, rebuilt, agentsSalvaged } = await openCatalogOrRecover(dataDir, log);
    try {
      const storeDir = join(dataDir, 'store');
      const q = { quarantined: rebuilt ? [rebuilt] : [] };
      const where = { dataDir, storeDir, logger: log };
      const manifests = stores.openManifestStore(where);
      const added = await rollForward(catalog, manifests, true, log, q);
      const store = await stores.openChunkStore(where);
      try {
        q.quarantined.push(...store.recovery.quarantined);
        const damaged = await checkImages(catalog, store, manifests, {
          deep: lostAnything(store), lost: store.recovery.lostBlobs, quarantined: store.recovery.quarantined, log,
        });
        return { added, quarantined: q.quarantined, damaged, agentsSalvaged };
      } finally {
        await store.close();
      }
    } finally {
      catalog.close();
    }
  } finally {
    lock.release();
  }
}

export interface ReindexReport {
  packs: number;
  blobs: number;
  skipped: SkippedPack[];
  damaged: DamagedImage[];
}

/**
 * `store reindex`: with the lock; unreadable packs are quarantined and
 * reported, images that needed them marked. A filesystem-store operation
 * (rebuilds index.sqlite from the pack trailers), so it names FsChunkStore.
 */
export async function reindexStore(dataDir: string, log?: Logger): Promise<ReindexReport> {
  const lock = takeDataDirLock(dataDir, 'store reindex');
  try {
    const storeDir = join(dataDir, 'store');
    const store = await FsChunkStore.open(storeDir, { logger: log, dataDir });
    try {
      const atOpen = [...store.recovery.quarantined];
      const r = await store.reindex();
      const skipped = [...atOpen.map((q) => ({ pack: q.object.replace(/^pack /, ''), reason: q.reason, quarantinedTo: q.to })), ...r.skipped];
      let damaged: DamagedImage[] = [];
      let catalog: Catalog | null = null;
      try {
        catalog = Catalog.open(join(dataDir, 'catalog.sqlite'));
      } catch (e) {
        log?.warn({ err: (e as Error).message }, 'catalog unreadable: damaged images not marked (run catalog rebuild)');
      }
      if (catalog) {
        try {
          damaged = await checkImages(catalog, store, new FsManifestStore(storeDir, dataDir), {
            deep: skipped.length > 0 || lostAnything(store), lost: store.recovery.lostBlobs,
            quarantined: [...store.recovery.quarantined, ...r.skipped.map((k) => ({ kind: 'pack' as const, object: `pack ${k.pack}`, from: '', to: k.quarantinedTo ?? '', reason: k.reason, at: '' }))], log,
          });
        } finally {
          catalog.close();
        }
      }
      return { packs: r.packs, blobs: r.blobs, skipped, damaged };
    } finally {
      await store.close();
    }
  } finally {
    lock.release();
  }
}

export function lostAnything(store: { recovery: StoreRecovery }): boolean {
  return store.recovery.quarantined.length > 0 || store.recovery.missingPacks.length > 0;
}

/**
 * What `verify` found goes into the catalog (DESIGN.md §6.1): a damaged image
 * gets one row per damaged object (chunks grouped by the pack their error
 * names, else one row for the chunks missing from the index), so it is
 * listed damaged and never used as a basis; an image verify found whole has
 * its damage rows cleared (an operator restored the object).
 */
export function recordVerifyReport(catalog: Catalog, r: VerifyReport): void {
  if (r.ok) {
    catalog.clearDamage(r.imageId);
    return;
  }
  for (const o of r.objects) catalog.recordDamage(r.imageId, o.object, `verify: ${o.code} ${o.message}`);
  const groups = new Map<string, VerifyReport['bad']>();
  for (const b of r.bad) {
    const pack = /pack ([0-9a-f]{64})/.exec(b.message)?.[1];
    const key = pack ? `pack ${pack}` : 'chunk blobs not in any readable pack';
    let g = groups.get(key);
    if (!g) groups.set(key, (g = []));
    g.push(b);
  }
  for (const [object, bad] of groups) {
    const first = bad[0]!;
    catalog.recordDamage(r.imageId, object, `verify: ${bad.length} chunk(s) bad, first chunk ${first.index} (${first.digest}): ${first.code} ${first.message}`);
  }
}
