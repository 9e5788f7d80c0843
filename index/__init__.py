"""Visual similarity search with FAISS over Lens embeddings."""
