"""Table Storage repositories, one module per table. Rows are pydantic models at the boundary."""
