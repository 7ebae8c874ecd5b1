/**
 * The mount manager's backend in the appliance: an export reads the image
 * through the chunk store (ImageSource, appliance/nbd/), and a writable one
 * writes into the mount's copy-on-write overlay, never into the image.
 */
import type { ChunkStore } from '../store/chunk-store.js';
import { CowOverlay } from '../nbd/cow-overlay.js';
import { ImageSource } from '../nbd/image-source.js';
import { readOnlyExport } from '../nbd/read-only-export.js';
import { writableExport } from '../nbd/writable-export.js';
import type { MountBackend, MountImage, OpenedExport } from './mount-backend.js';

export function nbdMountBackend(store: ChunkStore, opts: { cacheChunks?: number } = {}): MountBackend {
  const identity = (img: MountImage) => ({ volumeSize: img.size, chunkSize: img.chunkSize, rootDigest: img.rootDigest });
  return {
    async createOverlay(dir, image) {
      const o = await CowOverlay.create(dir, identity(image), { volatile: true });
      await o.close();
    },
    async open(image, overlayDir): Promise<OpenedExport> {
      const source = await ImageSource.open(store, image.rootDigest, opts.cacheChunks);
      if (!overlayDir) return { export: readOnlyExport(source), close: async () => undefined };
      // The overlay proves it belongs to this image (root, size, chunk size) before anything reads through it.
      // Volatile: the manager removes every overlay at its next start, so none outlives this process and a
      // client's FLUSH needs no fsync (DESIGN §10).
      const overlay = await CowOverlay.open(overlayDir, identity(image), { volatile: true });
      try {
        return { export: writableExport(source, overlay), close: () => overlay.close() };
      } catch (e) {
        await overlay.close();
        throw e;
      }
    },
  };
}
