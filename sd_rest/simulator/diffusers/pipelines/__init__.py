"""The stand-in for diffusers.pipelines."""
