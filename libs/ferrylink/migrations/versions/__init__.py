"""The shipped revisions (a package only so that it is installed with the library)."""
